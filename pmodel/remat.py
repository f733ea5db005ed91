"""Activation recompute (gradient checkpointing) as a Model transform.

``recompute(model, granularity=..., method=..., num_layers=...)`` returns a new :class:`Model`
whose ``layer_runner`` checkpoints blocks with non-reentrant :func:`torch.utils.checkpoint`:
activations inside a checkpointed region are dropped after the forward and recomputed during
the backward, trading compute for memory. The numbers are unchanged (same ops, same order), so
gradients are identical to the plain model's.

Granularities (Megatron / ModelLink's ``--recompute-granularity``):

* ``"full"``: whole blocks. ``method="uniform"`` checkpoints consecutive groups of
  ``num_layers`` blocks as one region (only each group's input is kept);
  ``method="block"`` checkpoints the first ``num_layers`` blocks of each pipeline stage (each
  virtual chunk under interleaving) one by one and runs the rest normally.
* ``"selective"``: only the attention core (scores, softmax, weighted sum). The block's
  projections keep their activations; the core's own saved state (the expanded GQA keys/values,
  softmax statistics, or the full ``T x T`` probabilities on backends that store them) is
  recomputed.

The transform works on the stage-local list of layers it is handed by
:meth:`Model.run_layers`, so "first N of each stage" needs no knowledge of the pipeline split.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from . import ops
from .model import Context, Model

__all__ = ["recompute", "Recompute"]

_GRANULARITIES = ("full", "selective")
_METHODS = ("uniform", "block")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recompute:
    """A recompute policy; callable as a :attr:`Model.layer_runner`.

    Attributes:
      granularity: ``"full"`` or ``"selective"``.
      method: ``"uniform"`` or ``"block"`` for full; None for selective.
      num_layers: group size (uniform) or blocks per stage (block) for full; None for selective.
      inner: the layer runner this one wraps (None = one ``block`` call per layer).
    """

    granularity: str
    method: str | None = None
    num_layers: int | None = None
    inner: Callable | None = None

    def __post_init__(self):
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"recompute: granularity must be one of {_GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "selective":
            # Megatron rejects a method with selective recompute too: there is nothing to choose.
            if self.method is not None or self.num_layers is not None:
                raise ValueError("recompute: method / num_layers apply to granularity='full' only; "
                                 f"got method={self.method!r}, num_layers={self.num_layers!r} with 'selective'")
            return
        if self.method not in _METHODS:
            raise ValueError(f"recompute: method must be one of {_METHODS} for granularity='full', got {self.method!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"recompute: num_layers must be a positive int, got {self.num_layers!r}")

    def _plain(self, block, layer_params, h, ctx, first):
        if self.inner is not None:
            return self.inner(block, layer_params, h, ctx, first)
        for i, lp in enumerate(layer_params):
            h = block(lp, h, ctx, first + i)
        return h

    def __call__(self, block: Callable, layer_params: list, h: torch.Tensor, ctx: Context, first: int) -> torch.Tensor:
        """Run blocks ``first, first + 1, ...`` over ``layer_params`` under this policy."""
        if self.granularity == "selective":
            core = ctx.attention_core or ops.attention

            def checkpointed_core(*args, **kwargs):
                return checkpoint(core, *args, use_reentrant=False, **kwargs)

            ctx = dataclasses.replace(ctx, attention_core=checkpointed_core)
            return self._plain(block, layer_params, h, ctx, first)

        n = len(layer_params)
        if self.method == "uniform":
            step = self.num_layers
            for s in range(0, n, step):
                group = layer_params[s: s + step]
                h = checkpoint(self._plain, block, group, h, ctx, first + s, use_reentrant=False)
            return h
        # "block": the first num_layers blocks of this stage are checkpointed one by one.
        k = min(self.num_layers, n)
        for i in range(k):
            h = checkpoint(self._plain, block, layer_params[i:i + 1], h, ctx, first + i, use_reentrant=False)
        return self._plain(block, layer_params[k:], h, ctx, first + k)


def recompute(model: Model, granularity: str = "full", method: str | None = None,
              num_layers: int | None = None) -> Model:
    """Activation recompute as a Model transform.

    Args:
      model: any :class:`Model` (plain, LoRA, tensor parallel, ...).
      granularity: ``"full"`` (whole blocks) or ``"selective"`` (attention core only).
      method: for ``"full"``: ``"uniform"`` (groups of ``num_layers`` blocks, default) or
        ``"block"`` (the first ``num_layers`` blocks of each pipeline stage); must be None for
        ``"selective"``.
      num_layers: for ``"full"``: the group size / number of blocks (default 1); must be None
        for ``"selective"``.

    Returns:
      a new :class:`Model`; gradients are identical, activation memory is lower.

    Raises:
      ValueError: unknown granularity / method, a method or count given with selective,
        ``num_layers`` not in ``[1, config.num_layers]``, or recompute applied twice.
    """
    if isinstance(model.layer_runner, Recompute) or "recompute" in model.transforms:
        raise ValueError("recompute: the model already has a recompute policy; apply it once")
    if granularity == "full":
        method = "uniform" if method is None else method
        num_layers = 1 if num_layers is None else num_layers
        if isinstance(num_layers, int) and num_layers > model.config.num_layers:
            raise ValueError(f"recompute: num_layers={num_layers} exceeds the model's "
                             f"{model.config.num_layers} layers")
    policy = Recompute(granularity=granularity, method=method, num_layers=num_layers,
                       inner=model.layer_runner)
    return model.replace(layer_runner=policy, transforms=model.transforms + ("recompute",))
