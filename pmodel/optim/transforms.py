"""Gradient transformations: Adam moments, weight decay, learning-rate scaling, momentum,
global-norm clipping, and the composed :func:`adamw` / :func:`sgd`.

Every transform works on lists of live leaves with ``torch._foreach_*`` kernels (one call per
op for the whole tree instead of one per tensor), which matters on CPU where the optimizer
touches every parameter ~10 times per step.

Buffer donation: ``update`` may overwrite the ``updates`` tensors it is given and return them
(as a donated buffer in JAX). Allocating a fresh parameter-sized tree at every stage of
``chain(adam, decay, lr)`` would cost three extra copies of the model at the optimizer's peak;
in place it costs one (Adam's denominator). Pass a copy if you need the gradients afterwards.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import tree
from .base import EmptyState, GradientTransformation, chain, global_norm, masked, weight_decay_mask
from .schedules import Schedule, constant

__all__ = [
    "ScaleByAdamState", "ScaleByScheduleState", "TraceState", "ClipState", "scale_by_adam",
    "add_decayed_weights", "scale_by_learning_rate", "trace", "clip_by_global_norm", "adamw", "sgd",
    "current_lr",
]


def _is_none(x) -> bool:
    return x is None


def _flat(t):
    """``(leaves_with_None, treedef, live_indices)``."""
    leaves, spec = tree.flatten(t, is_leaf=_is_none)
    return leaves, spec, [i for i, x in enumerate(leaves) if x is not None]


def _fill(spec, n: int, idx: list[int], values: list):
    out = [None] * n
    for i, v in zip(idx, values):
        out[i] = v
    return tree.unflatten(out, spec)


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor   # int64 scalar: updates applied so far
    mu: Any               # first moments, fp32, shaped like params (None for frozen)
    nu: Any               # second moments


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, fused: bool = True) -> GradientTransformation:
    """Adam's bias-corrected ``m_hat / (sqrt(v_hat) + eps)`` (moments kept in fp32).

    Args:
      b1, b2, eps: Adam's constants.
      fused: use PyTorch's fused Adam kernel (``torch._fused_adam_``, the kernel behind
        ``torch.optim.Adam(fused=True)``; CPU and CUDA) when every gradient is on one such
        device. It reads and writes each buffer once instead of the ~10 passes of the unfused
        ``_foreach`` sequence; the result agrees with it and with ``torch.optim.AdamW`` to
        rounding. ``fused=False`` runs the unfused sequence (same order of operations as
        ``torch.optim.AdamW``: ``m.lerp_(g, 1-b1)``, ``v.mul_(b2).addcmul_(g, g, 1-b2)``,
        ``sqrt(v)/sqrt(1-b2^t) + eps``, ``m / denom / (1-b1^t)``).
    """
    if not (0 <= b1 < 1 and 0 <= b2 < 1 and eps >= 0):
        raise ValueError(f"scale_by_adam: need 0 <= b1, b2 < 1 and eps >= 0, got {b1}, {b2}, {eps}")

    def init(params):
        z = lambda p: None if p is None else torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
        mu = tree.map(z, params, is_leaf=_is_none)
        nu = tree.map(z, params, is_leaf=_is_none)
        return ScaleByAdamState(count=torch.zeros((), dtype=torch.int64), mu=mu, nu=nu)

    @torch.no_grad()
    def update(updates, state, params=None):
        leaves, spec, idx = _flat(updates)
        mu = [x for x in tree.leaves(state.mu, is_leaf=_is_none) if x is not None]
        nu = [x for x in tree.leaves(state.nu, is_leaf=_is_none) if x is not None]
        g = [leaves[i].float() for i in idx]
        if len(g) != len(mu):
            raise ValueError(f"scale_by_adam: {len(g)} gradients but state for {len(mu)} leaves")
        count = state.count + 1
        t = int(count)
        devs = {x.device for x in g}
        if fused and g and len(devs) == 1 and next(iter(devs)).type in ("cpu", "cuda"):
            dev = next(iter(devs))
            out = [torch.zeros_like(x) for x in g]
            step = torch.tensor(float(t), device=dev)  # the kernel reads the (already incremented) step
            # lr = -1 turns the kernel's "p -= lr * m_hat / (sqrt(v_hat) + eps)" into writing
            # +m_hat / (sqrt(v_hat) + eps) into the zero buffers: the update, not a new param.
            torch._fused_adam_(out, g, mu, nu, [], [step] * len(g), lr=-1.0, beta1=b1, beta2=b2,
                               weight_decay=0.0, eps=eps, amsgrad=False, maximize=False)
            return _fill(spec, len(leaves), idx, out), ScaleByAdamState(count=count, mu=state.mu, nu=state.nu)
        torch._foreach_lerp_(mu, g, 1 - b1)
        torch._foreach_mul_(nu, b2)
        torch._foreach_addcmul_(nu, g, g, 1 - b2)
        bc1, bc2_sqrt = 1 - b1 ** t, (1 - b2 ** t) ** 0.5
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        out = g  # donated: the (fp32) gradient buffers receive m / denom
        torch._foreach_copy_(out, mu)
        torch._foreach_div_(out, denom)
        del denom
        torch._foreach_div_(out, bc1)
        return _fill(spec, len(leaves), idx, out), ScaleByAdamState(count=count, mu=state.mu, nu=state.nu)

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float, mask=None) -> GradientTransformation:
    """``u + weight_decay * p`` (decoupled weight decay; scaled by the lr afterwards).

    Args:
      weight_decay: the coefficient.
      mask: tree of bools or ``params -> tree`` choosing the decayed leaves
        (see :func:`~pmodel.optim.weight_decay_mask`); None = all.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")

    @torch.no_grad()
    def update(updates, state, params=None):
        if weight_decay == 0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights needs params")
        leaves, spec, idx = _flat(updates)
        plist = tree.leaves(params, is_leaf=_is_none)
        u = [leaves[i] for i in idx]
        p = [plist[i].float() if plist[i].dtype != u[k].dtype else plist[i] for k, i in enumerate(idx)]
        torch._foreach_add_(u, p, alpha=weight_decay)
        out = u
        return _fill(spec, len(leaves), idx, out), state

    t = GradientTransformation(lambda params: EmptyState(), update)
    return masked(t, mask) if mask is not None else t


class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor   # int64: updates applied so far
    lr: torch.Tensor      # fp64: the learning rate the last update used (for logging)


def scale_by_learning_rate(learning_rate: float | Schedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply by ``-lr`` (``lr`` a float or a ``count -> lr`` schedule)."""
    sched = learning_rate if callable(learning_rate) else constant(learning_rate)
    sign = -1.0 if flip_sign else 1.0

    def init(params):
        return ScaleByScheduleState(count=torch.zeros((), dtype=torch.int64),
                                    lr=torch.tensor(float(sched(0)), dtype=torch.float64))

    @torch.no_grad()
    def update(updates, state, params=None):
        lr = float(sched(int(state.count)))
        leaves, spec, idx = _flat(updates)
        out = [leaves[i] for i in idx]
        torch._foreach_mul_(out, sign * lr)
        return (_fill(spec, len(leaves), idx, out),
                ScaleByScheduleState(count=state.count + 1, lr=torch.tensor(lr, dtype=torch.float64)))

    return GradientTransformation(init, update)


def current_lr(state) -> float | None:
    """The learning rate the last update used (None if the state has no schedule)."""
    from .base import find_states
    found = find_states(state, ScaleByScheduleState)
    return float(found[0].lr) if found else None


class TraceState(NamedTuple):
    trace: Any


def trace(decay: float, nesterov: bool = False) -> GradientTransformation:
    """Momentum as ``torch.optim.SGD``: ``buf = decay * buf + g`` (first step ``buf = g``);
    the update is ``buf`` or, with Nesterov, ``g + decay * buf``."""
    if decay < 0:
        raise ValueError(f"momentum must be >= 0, got {decay}")

    def init(params):
        return TraceState(trace=tree.map(lambda p: None if p is None else torch.zeros_like(p, dtype=torch.float32),
                                         params, is_leaf=_is_none))

    @torch.no_grad()
    def update(updates, state, params=None):
        leaves, spec, idx = _flat(updates)
        buf = [x for x in tree.leaves(state.trace, is_leaf=_is_none) if x is not None]
        g = [leaves[i].float() for i in idx]
        # torch's first step copies g into the buffer; from zeros, decay*0 + g is the same value.
        torch._foreach_mul_(buf, decay)
        torch._foreach_add_(buf, g)
        if nesterov:
            torch._foreach_add_(g, buf, alpha=decay)
        else:
            torch._foreach_copy_(g, buf)
        out = g
        return _fill(spec, len(leaves), idx, out), state

    return GradientTransformation(init, update)


class ClipState(NamedTuple):
    norm: torch.Tensor    # fp32: the global norm of the last gradients seen (before clipping)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (norm + 1e-6))`` (as ``torch.nn.utils.clip_grad_norm_``
    and Megatron's ``--clip-grad``). The norm is kept in the state for logging."""
    if max_norm <= 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be positive, got {max_norm}")

    def init(params):
        return ClipState(norm=torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def update(updates, state, params=None):
        norm = global_norm(updates)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        leaves, spec, idx = _flat(updates)
        live = [leaves[i] for i in idx]
        if live:
            torch._foreach_mul_(live, coef.to(live[0].device))
        out = live
        return _fill(spec, len(leaves), idx, out), ClipState(norm=norm.detach().cpu().float())

    return GradientTransformation(init, update)


def adamw(learning_rate: float | Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, *, mask: Any = weight_decay_mask, fused: bool = True) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter), the same update as ``torch.optim.AdamW``.

    Args:
      learning_rate: a float or a ``count -> lr`` schedule.
      b1, b2, eps: Adam's constants.
      weight_decay: decoupled weight decay coefficient.
      mask: which leaves are decayed: a bool tree, ``params -> bool tree``, or None for all.
        Default :func:`~pmodel.optim.weight_decay_mask` (no decay on norms, biases, embeddings).
      fused: see :func:`scale_by_adam`.

    Returns:
      ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``.
    """
    return chain(scale_by_adam(b1, b2, eps, fused=fused), add_decayed_weights(weight_decay, mask),
                 scale_by_learning_rate(learning_rate))


def sgd(learning_rate: float | Schedule, momentum: float = 0.0, *, nesterov: bool = False,
        weight_decay: float = 0.0, mask: Any = None) -> GradientTransformation:
    """SGD with optional momentum, as ``torch.optim.SGD`` (coupled L2 weight decay added to the
    gradient before momentum, as torch does)."""
    parts: list[GradientTransformation] = []
    if weight_decay:
        parts.append(add_decayed_weights(weight_decay, mask))
    if momentum:
        parts.append(trace(momentum, nesterov))
    elif nesterov:
        raise ValueError("sgd: nesterov needs momentum > 0")
    parts.append(scale_by_learning_rate(learning_rate))
    return chain(*parts)
