"""The optax contract: a :class:`GradientTransformation` is a pair of pure functions.

``init(params) -> state`` and ``update(updates, state, params) -> (updates, state)``. Gradients,
updates and states are pytrees shaped like ``params``; a frozen leaf (``requires_grad`` False)
has ``None`` in each of them, so it gets no gradient, no optimizer state and no update.
States are NamedTuples of tensors (also the step counters), which keeps them checkpointable as
safetensors without pickling.

Only :func:`apply_updates` mutates anything: it changes the parameter tensors in place under
``no_grad`` (they stay the same autograd leaves, so nothing that holds them goes stale).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import torch

from .. import tree

__all__ = [
    "GradientTransformation", "Assign", "EmptyState", "identity", "chain", "masked",
    "multi_transform", "apply_updates", "global_norm", "tree_map", "trainable_mask",
    "weight_decay_mask", "find_states",
]


class GradientTransformation(NamedTuple):
    """A pair ``(init, update)``.

    Attributes:
      init: ``params -> state``.
      update: ``(updates, state, params) -> (updates, state)``; ``params`` may be None for
        transforms that do not read them.
    """

    init: Callable[[Any], Any]
    update: Callable[..., tuple[Any, Any]]


class EmptyState(NamedTuple):
    """State of a stateless transform."""


@dataclasses.dataclass(frozen=True)
class Assign:
    """An update leaf that *sets* the parameter instead of adding to it.

    Mixed precision uses it to write the rounded fp32 main weight into a bf16/fp16 parameter
    exactly (``p + (main - p)`` in low precision would round twice).
    """

    value: torch.Tensor


def _is_none(x) -> bool:
    return x is None


def tree_map(f: Callable, t: Any, *rest: Any) -> Any:
    """``tree.map`` that keeps ``None`` (frozen) leaves of ``t`` as ``None``."""
    return tree.map(lambda x, *r: None if x is None else f(x, *r), t, *rest, is_leaf=_is_none)


def _live(t: Any) -> list:
    return [x for x in tree.leaves(t, is_leaf=_is_none) if x is not None]


def identity() -> GradientTransformation:
    """Passes updates through unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None: (u, s))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states."""
    def init(params):
        return tuple(t.init(params) for t in transforms)

    def update(updates, state, params=None):
        if len(state) != len(transforms):
            raise ValueError(f"chain: state has {len(state)} entries for {len(transforms)} transforms")
        new = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new.append(s)
        return updates, tuple(new)

    return GradientTransformation(init, update)


def _resolve_mask(mask, params):
    m = mask(params) if callable(mask) else mask
    flat_p = tree.leaves(params, is_leaf=_is_none)
    flat_m = tree.leaves(m, is_leaf=_is_none)
    if len(flat_p) != len(flat_m):
        raise ValueError(f"mask has {len(flat_m)} leaves but params have {len(flat_p)}")
    return m


def masked(inner: GradientTransformation, mask) -> GradientTransformation:
    """Apply ``inner`` only where ``mask`` is True; elsewhere updates pass through unchanged.

    Args:
      inner: the transform.
      mask: a tree of bools shaped like params, or ``params -> tree of bools``.

    Returns:
      a transform whose ``inner`` state exists only for masked-in leaves.
    """
    def select(t, m):
        return tree.map(lambda x, keep: x if (keep and x is not None) else None, t, m, is_leaf=_is_none)

    def init(params):
        return inner.init(select(params, _resolve_mask(mask, params)))

    def update(updates, state, params=None):
        m = _resolve_mask(mask, params if params is not None else updates)
        sub, state = inner.update(select(updates, m), state, None if params is None else select(params, m))
        merged = tree.map(lambda u, s, keep: s if (keep and u is not None) else u, updates, sub, m,
                          is_leaf=_is_none)
        return merged, state

    return GradientTransformation(init, update)


def multi_transform(transforms: dict[str, GradientTransformation], labels) -> GradientTransformation:
    """Route each leaf to the transform named by its label (optax ``multi_transform``).

    Args:
      transforms: label -> transform.
      labels: a tree of labels shaped like params, or ``params -> tree of labels``.
    """
    def masks(params):
        lab = labels(params) if callable(labels) else labels
        known = set(transforms)
        bad = {x for x in tree.leaves(lab) if x not in known}
        if bad:
            raise ValueError(f"multi_transform: labels {sorted(bad)} have no transform (known {sorted(known)})")
        return {k: tree.map(lambda x, k=k: x == k, lab) for k in transforms}

    parts = {k: masked(t, lambda p, k=k: masks(p)[k]) for k, t in transforms.items()}

    def init(params):
        return {k: t.init(params) for k, t in parts.items()}

    def update(updates, state, params=None):
        new = {}
        for k, t in parts.items():
            updates, new[k] = t.update(updates, state[k], params)
        return updates, new

    return GradientTransformation(init, update)


@torch.no_grad()
def apply_updates(params, updates):
    """Add ``updates`` to ``params`` in place (``Assign`` leaves set instead); returns ``params``.

    The parameter tensors stay the same autograd leaves; ``None`` updates (frozen leaves) are
    skipped.
    """
    pairs = [(p, u) for p, u in zip(tree.leaves(params, is_leaf=_is_none), tree.leaves(updates, is_leaf=_is_none))
             if u is not None and p is not None]
    if len(tree.leaves(params, is_leaf=_is_none)) != len(tree.leaves(updates, is_leaf=_is_none)):
        raise ValueError("apply_updates: updates and params have different structures")
    add_p, add_u = [], []
    for p, u in pairs:
        if isinstance(u, Assign):
            p.copy_(u.value)
        elif u.dtype == p.dtype:
            add_p.append(p)
            add_u.append(u)
        else:
            p.add_(u.to(p.dtype))
    if add_p:
        torch._foreach_add_(add_p, add_u)
    return params


def global_norm(updates) -> torch.Tensor:
    """L2 norm over every (non-None) leaf, in fp32 (a 0-d tensor)."""
    leaves = _live(updates)
    if not leaves:
        return torch.zeros(())
    norms = torch._foreach_norm([x.float() if x.dtype != torch.float32 else x for x in leaves])
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def trainable_mask(params):
    """True for leaves that take part in training (floating point and ``requires_grad``)."""
    return tree.map(lambda p: bool(p.is_floating_point() and p.requires_grad), params)


def weight_decay_mask(params, *, embeddings: bool = False, norms: bool = False, biases: bool = False):
    """Which leaves get weight decay.

    By default only the matrices of the linear layers (attention, MLP, output layer): norms,
    biases and embeddings (token / position) are excluded unless asked, as in most LLM recipes
    (GPT-3 / Megatron exclude biases and norms; embeddings follow nanoGPT's choice of decaying
    only matmul weights). The output layer of an untied model is a linear layer and is decayed.

    Args:
      params: the params tree (any leaf types; paths are what count).
      embeddings, norms, biases: also decay these.

    Returns:
      a tree of bools shaped like params.
    """
    def rule(path: str, leaf) -> bool:
        parts = path.split(".")
        if any(p in ("embed", "pos_embed") for p in parts):
            return embeddings
        if any("norm" in p for p in parts):
            return norms
        if parts[-1] == "bias" or (getattr(leaf, "dim", lambda: 2)() < 2):
            return biases
        return True

    return tree.map_with_path(rule, params)


def find_states(state, cls) -> list:
    """Every sub-state of type ``cls`` inside a (nested) optimizer state, in order."""
    out = []

    def walk(s):
        if isinstance(s, cls):
            out.append(s)
        elif isinstance(s, tuple):
            for x in s:
                walk(x)
        elif isinstance(s, dict):
            for x in s.values():
                walk(x)
    walk(state)
    return out
