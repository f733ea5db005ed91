"""Mixed precision: low-precision params and activations, fp32 main weights in the optimizer.

The model runs on bf16 or fp16 parameters (``ModelConfig.dtype``). :func:`mixed_precision`
wraps an optimizer so that its state holds an fp32 *main* copy of every trainable parameter
plus the inner optimizer's fp32 moments; each step casts the gradients to fp32, updates the
main weights and writes them back rounded into the model's parameters (an
:class:`~pmodel.optim.Assign` update, so the write is exact).

Bytes per trainable parameter, counted as Megatron does (its ``distrib_optimizer`` table):
low-precision param 2 + low-precision grad 2 + fp32 main param 4 + fp32 main grad 4 +
Adam moments 8 = **20**; with fp32 gradient accumulation (``Policy.grad_accum_fp32``) the fp32
accumulation buffer *is* the main grad, so 2 + 4 + 4 + 8 = **18**. See :func:`bytes_per_param`.

fp16 needs loss scaling: :class:`LossScale` multiplies the loss by ``scale`` before backward,
the update divides the gradients by it, and a step whose gradients hold inf/nan is skipped
(no parameter or moment changes), the scale is backed off, and it grows again after
``growth_interval`` clean steps (Megatron's ``DynamicGradScaler``, with its hysteresis). bf16
has fp32's exponent range and runs unscaled.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, NamedTuple

import torch

from . import tree
from .optim.base import Assign, EmptyState, GradientTransformation, apply_updates, find_states, tree_map

__all__ = ["LossScale", "Policy", "LossScaleState", "MixedPrecisionState", "mixed_precision", "init_loss_scale",
           "next_loss_scale",
           "cast_params", "loss_scale", "last_step_skipped", "bytes_per_param"]

_DTYPES = types.MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossScale:
    """Dynamic loss scaling (defaults follow Megatron's ``--initial-loss-scale`` 2**32,
    ``--loss-scale-window`` 1000, ``--hysteresis`` 2, ``--min-loss-scale`` 1).

    Attributes:
      initial: starting scale.
      growth_interval: clean steps before the scale is multiplied by ``growth``.
      growth, backoff: factors (``backoff`` in (0, 1)).
      hysteresis: overflowing steps tolerated before backing off (every overflow still skips).
      min_scale: the scale never goes below this.
    """

    initial: float = 2.0 ** 32
    growth_interval: int = 1000
    growth: float = 2.0
    backoff: float = 0.5
    hysteresis: int = 2
    min_scale: float = 1.0

    def __post_init__(self):
        if not self.initial > 0 or not self.min_scale > 0:
            raise ValueError(f"LossScale: initial ({self.initial}) and min_scale ({self.min_scale}) must be positive")
        if self.growth_interval < 1 or self.hysteresis < 1:
            raise ValueError("LossScale: growth_interval and hysteresis must be >= 1")
        if not self.growth > 1 or not 0 < self.backoff < 1:
            raise ValueError(f"LossScale: need growth > 1 and 0 < backoff < 1, got {self.growth}, {self.backoff}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """Precision policy.

    Attributes:
      param_dtype: dtype of the model's parameters and activations (``torch.float32``,
        ``torch.bfloat16`` or ``torch.float16``, or ``"fp32" / "bf16" / "fp16"``).
      grad_accum_fp32: accumulate micro-batch gradients in fp32 (else in ``param_dtype``).
      loss_scale: a :class:`LossScale`; required for fp16 (default one is created), None = unscaled.
    """

    param_dtype: Any = torch.float32
    grad_accum_fp32: bool = False
    loss_scale: LossScale | None = None

    def __post_init__(self):
        dt = _DTYPES.get(self.param_dtype, self.param_dtype)
        if dt not in _DTYPES.values():
            raise ValueError(f"Policy.param_dtype must be one of fp32 / bf16 / fp16, got {self.param_dtype!r}")
        object.__setattr__(self, "param_dtype", dt)
        if dt == torch.float16 and self.loss_scale is None:
            object.__setattr__(self, "loss_scale", LossScale())

    @property
    def mixed(self) -> bool:
        return self.param_dtype != torch.float32


class LossScaleState(NamedTuple):
    scale: torch.Tensor          # fp32 scalar
    good_steps: torch.Tensor     # int64: clean steps since the last change
    hysteresis: torch.Tensor     # int64: overflows left before the next back-off
    skipped: torch.Tensor        # int64 0/1: the last step was skipped
    total_skipped: torch.Tensor  # int64


class MixedPrecisionState(NamedTuple):
    main: Any           # fp32 main weights (None leaves: frozen); None when params are fp32
    inner: Any
    loss_scale: Any     # LossScaleState or EmptyState


def cast_params(params, dtype: torch.dtype):
    """A copy of ``params`` in ``dtype`` (floating leaves), keeping ``requires_grad``."""
    def cast(p):
        if not p.is_floating_point() or p.dtype == dtype:
            return p
        return p.detach().to(dtype).requires_grad_(p.requires_grad)
    return tree.map(cast, params)


def _finite(leaves: list[torch.Tensor]) -> bool:
    if not leaves:
        return True
    norms = torch._foreach_norm(leaves)
    return bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())


def init_loss_scale(ls: LossScale | None):
    """The initial loss-scale state for ``ls`` (``EmptyState()`` when None: no scaling)."""
    if ls is None:
        return EmptyState()
    return LossScaleState(scale=torch.tensor(ls.initial, dtype=torch.float32),
                          good_steps=torch.zeros((), dtype=torch.int64),
                          hysteresis=torch.tensor(ls.hysteresis, dtype=torch.int64),
                          skipped=torch.zeros((), dtype=torch.int64), total_skipped=torch.zeros((), dtype=torch.int64))


def next_loss_scale(ls: LossScale, s: "LossScaleState", finite: bool) -> "LossScaleState":
    """The loss-scale state after a step whose (unscaled) gradients were ``finite`` or not.

    An overflow skips the step and, once ``hysteresis`` overflows have been seen, multiplies the
    scale by ``backoff`` (not below ``min_scale``); ``growth_interval`` clean steps in a row
    multiply it by ``growth``. The one rule for every layout: single process and parallel plans
    decide ``finite`` from their global gradient norm, so every rank takes the same branch.
    """
    if not finite:
        hyst = int(s.hysteresis) - 1
        scale = float(s.scale)
        if hyst <= 0:
            scale, hyst = max(scale * ls.backoff, ls.min_scale), ls.hysteresis
        return LossScaleState(scale=torch.tensor(scale, dtype=torch.float32),
                              good_steps=torch.zeros((), dtype=torch.int64),
                              hysteresis=torch.tensor(hyst, dtype=torch.int64),
                              skipped=torch.ones((), dtype=torch.int64), total_skipped=s.total_skipped + 1)
    good = int(s.good_steps) + 1
    scale = float(s.scale)
    if good >= ls.growth_interval:
        scale, good = scale * ls.growth, 0
    return LossScaleState(scale=torch.tensor(scale, dtype=torch.float32), good_steps=torch.tensor(good, dtype=torch.int64),
                          hysteresis=s.hysteresis, skipped=torch.zeros((), dtype=torch.int64),
                          total_skipped=s.total_skipped)


def mixed_precision(tx: GradientTransformation, policy: Policy) -> GradientTransformation:
    """Wrap ``tx`` with fp32 main weights and (optional) dynamic loss scaling.

    Args:
      tx: the inner optimizer; it sees fp32 gradients and fp32 main weights.
      policy: the :class:`Policy`.

    Returns:
      a transform whose updates are :class:`~pmodel.optim.Assign` leaves (write the new main
      weight into the low-precision param) when ``policy.mixed``, plain fp32 deltas otherwise;
      a skipped step returns ``None`` updates everywhere.
    """
    ls = policy.loss_scale

    def trainable(p):
        return p.is_floating_point() and p.requires_grad

    def init(params):
        if policy.mixed:
            main = tree.map(lambda p: p.detach().float().clone() if trainable(p) else None, params)
            inner = tx.init(main)
        else:
            main, inner = None, tx.init(tree.map(lambda p: p if trainable(p) else None, params))
        return MixedPrecisionState(main=main, inner=inner, loss_scale=init_loss_scale(ls))

    @torch.no_grad()
    def update(grads, state, params=None):
        # fp32 gradients (a copy for low-precision grads: Megatron's fp32 "main grad").
        g32 = tree_map(lambda g: g if g.dtype == torch.float32 else g.float(), grads)
        s = state.loss_scale
        if ls is not None:
            # Unscale in place (the gradients are donated, see pmodel.optim.transforms).
            live = [g for g in tree.leaves(g32) if g is not None]
            torch._foreach_mul_(live, 1.0 / float(s.scale))
            finite = _finite(live)
            s = next_loss_scale(ls, s, finite)
            if not finite:
                return tree.map(lambda g: None, grads, is_leaf=lambda x: x is None), state._replace(loss_scale=s)
        if state.main is None:
            updates, inner = tx.update(g32, state.inner, params)
            return updates, MixedPrecisionState(main=None, inner=inner, loss_scale=s)
        updates, inner = tx.update(g32, state.inner, state.main)
        apply_updates(state.main, updates)
        out = tree.map(lambda m, p: None if m is None else Assign(m.to(p.dtype)), state.main, params
                       if params is not None else state.main, is_leaf=lambda x: x is None)
        return out, MixedPrecisionState(main=state.main, inner=inner, loss_scale=s)

    return GradientTransformation(init, update)


def loss_scale(opt_state) -> float:
    """The current loss scale in an optimizer state (1.0 when unscaled)."""
    found = find_states(opt_state, LossScaleState)
    return float(found[0].scale) if found else 1.0


def last_step_skipped(opt_state) -> bool:
    """True when the last update was skipped for inf/nan gradients."""
    found = find_states(opt_state, LossScaleState)
    return bool(int(found[0].skipped)) if found else False


def bytes_per_param(policy: Policy, *, optimizer_moments: int = 2) -> int:
    """Training bytes per trainable parameter (params + grads + main weights/grads + moments).

    Args:
      policy: the precision policy.
      optimizer_moments: fp32 tensors the optimizer keeps per parameter (Adam: 2).

    Returns:
      20 for bf16/fp16 with low-precision grads, 18 with fp32 grad accumulation, 16 for fp32
      (4 + 4 + 8), with Adam.
    """
    moments = 4 * optimizer_moments
    if not policy.mixed:
        return 4 + 4 + moments
    if policy.grad_accum_fp32:
        return 2 + 4 + 4 + moments
    return 2 + 2 + 4 + 4 + moments
