"""Learning-rate schedules: ``count -> lr`` where ``count`` is the number of updates already
applied (0 on the first step), as in optax and Megatron's ``OptimizerParamScheduler``.

:func:`megatron` reproduces ``--lr-decay-style`` (constant, linear, cosine,
inverse-square-root) with ``--lr-warmup-iters``, ``--lr-decay-iters`` and ``--min-lr``:
linear warmup from 0 to ``lr`` over the warmup steps (so the very first step uses lr 0, as in
Megatron), then decay from ``lr`` to ``min_lr`` until ``decay_steps``, then ``min_lr``.
"""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["Schedule", "constant", "linear_warmup", "megatron", "STYLES"]

Schedule = Callable[[int], float]
STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def constant(value: float) -> Schedule:
    """``lr = value`` at every step."""
    value = float(value)
    return lambda count: value


def linear_warmup(peak: float, warmup_steps: int, init: float = 0.0) -> Schedule:
    """``init -> peak`` linearly over ``warmup_steps``, then ``peak``."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def f(count: int) -> float:
        if warmup_steps == 0 or count >= warmup_steps:
            return float(peak)
        return init + (peak - init) * count / warmup_steps
    return f


def megatron(*, lr: float, min_lr: float = 0.0, warmup_steps: int = 0, decay_steps: int | None = None,
             style: str = "linear") -> Schedule:
    """Megatron's warmup + decay schedule.

    Args:
      lr: peak learning rate (``--lr``).
      min_lr: floor after decay (``--min-lr``).
      warmup_steps: linear warmup length (``--lr-warmup-iters``).
      decay_steps: step at which decay reaches ``min_lr`` (``--lr-decay-iters``, default: the
        number of training iterations, which the caller must then pass).
      style: ``constant``, ``linear``, ``cosine`` or ``inverse-square-root``
        (``--lr-decay-style``).

    Returns:
      ``count -> lr``.
    """
    if style not in STYLES:
        raise ValueError(f"lr decay style must be one of {STYLES}, got {style!r}")
    if lr < 0 or min_lr < 0 or min_lr > lr:
        raise ValueError(f"need 0 <= min_lr <= lr, got lr={lr}, min_lr={min_lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if style in ("linear", "cosine"):
        if decay_steps is None:
            raise ValueError(f"lr decay style {style!r} needs decay_steps (e.g. the number of training steps)")
        if decay_steps <= warmup_steps:
            raise ValueError(f"decay_steps ({decay_steps}) must exceed warmup_steps ({warmup_steps})")

    def f(count: int) -> float:
        if warmup_steps > 0 and count <= warmup_steps:
            return lr * count / warmup_steps
        if style == "constant":
            return lr
        if style == "inverse-square-root":
            w = max(warmup_steps, 1)
            return max(min_lr, lr * math.sqrt(w) / math.sqrt(max(count, 1)))
        if count > decay_steps:
            return min_lr
        ratio = (count - warmup_steps) / (decay_steps - warmup_steps)
        coeff = 1.0 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (lr - min_lr)
    return f
