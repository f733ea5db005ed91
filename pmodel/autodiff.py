"""``value_and_grad``: JAX's signature on top of ``torch.autograd``.

torch.func transforms do not run saved-tensor hooks (activation checkpointing, communication
overlap), so the training path differentiates with ``torch.autograd.grad`` over the parameter
leaves instead. It never touches ``.grad``: gradients are returned as a fresh tree.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import tree

__all__ = ["value_and_grad", "grad"]


def _is_none(x) -> bool:
    return x is None


def value_and_grad(f: Callable, *, has_aux: bool = False, argnum: int = 0) -> Callable:
    """Wrap ``f(params, *args)`` to also return gradients with respect to ``params``.

    Args:
      f: returns a scalar tensor, or ``(scalar, aux)`` when ``has_aux``.
      has_aux: ``f`` returns ``(value, aux)``.
      argnum: which positional argument is the params tree.

    Returns:
      ``g(*args, **kw) -> (value, grads)`` or ``((value, aux), grads)``. ``grads`` has the
      structure of the params tree; trainable leaves (floating point with ``requires_grad``)
      get a gradient tensor (zeros if the value does not depend on them), frozen leaves ``None``.
      ``value`` is detached.
    """
    def wrapped(*args, **kw):
        params = args[argnum]
        flat, spec = tree.flatten(params, is_leaf=_is_none)
        idx = [i for i, p in enumerate(flat)
               if isinstance(p, torch.Tensor) and p.is_floating_point() and p.requires_grad]
        with torch.enable_grad():
            out = f(*args, **kw)
            value, aux = out if has_aux else (out, None)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TypeError(f"value_and_grad: f must return a scalar tensor, got "
                                f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
            leaves = [flat[i] for i in idx]
            gs = torch.autograd.grad(value, leaves, allow_unused=True) if value.requires_grad else [None] * len(leaves)
        grads = [None] * len(flat)
        for i, g in zip(idx, gs):
            grads[i] = g if g is not None else torch.zeros_like(flat[i])
        g_tree = tree.unflatten(grads, spec)
        value = value.detach()
        return ((value, aux), g_tree) if has_aux else (value, g_tree)

    return wrapped


def grad(f: Callable, *, has_aux: bool = False, argnum: int = 0) -> Callable:
    """Like :func:`value_and_grad` but returns only the gradients (and aux when ``has_aux``)."""
    vg = value_and_grad(f, has_aux=has_aux, argnum=argnum)

    def wrapped(*args, **kw):
        (v, g) = vg(*args, **kw)
        return (g, v[1]) if has_aux else g
    return wrapped
