"""Gradient accumulation as a transform (optax ``MultiSteps``).

``accumulate(tx, every=k)`` sums incoming gradients (in fp32 by default) and runs ``tx`` once
every ``k`` calls on their mean; in between it returns zero updates. :func:`pmodel.train.train_step`
accumulates micro-batches itself (one optimizer call per global batch, weighting by tokens),
which is what the training loop uses; this transform is for callers that feed one micro-batch
gradient per call.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .base import GradientTransformation, tree_map

__all__ = ["AccumulateState", "accumulate"]


class AccumulateState(NamedTuple):
    mini_step: torch.Tensor   # int64: gradients summed since the last inner update
    acc: Any                  # the running sum
    inner: Any


def accumulate(tx: GradientTransformation, every: int, *, dtype: torch.dtype | None = torch.float32) -> GradientTransformation:
    """Run ``tx`` on the mean of every ``every`` consecutive gradients.

    Args:
      tx: the inner transform.
      every: number of gradients per inner update (1 = pass-through).
      dtype: accumulation dtype (None: the gradient's own dtype).
    """
    if every < 1:
        raise ValueError(f"accumulate: every must be >= 1, got {every}")

    def init(params):
        acc = tree_map(lambda p: torch.zeros_like(p, dtype=dtype or p.dtype), params)
        return AccumulateState(torch.zeros((), dtype=torch.int64), acc, tx.init(params))

    @torch.no_grad()
    def update(updates, state, params=None):
        tree_map(lambda a, g: a.add_(g.to(a.dtype)), state.acc, updates)
        k = int(state.mini_step) + 1
        if k < every:
            zeros = tree_map(lambda g: torch.zeros_like(g), updates)
            return zeros, AccumulateState(torch.tensor(k), state.acc, state.inner)
        mean = tree_map(lambda a, g: (a / every).to(g.dtype), state.acc, updates)
        out, inner = tx.update(mean, state.inner, params)
        tree_map(lambda a: a.zero_(), state.acc)
        return out, AccumulateState(torch.zeros((), dtype=torch.int64), state.acc, inner)

    return GradientTransformation(init, update)
