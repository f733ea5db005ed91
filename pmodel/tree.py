"""The one pytree facade.

Everything in pmodel that walks a parameter tree goes through these few functions, so the
underlying implementation (``torch.utils._pytree``) can change in one place. Trees are nested
dicts / lists / tuples; wrapper weights (LoRA, parallel roles) register themselves as pytree
nodes so they are traversed like containers.

Paths are dotted strings: ``"layers.3.attn.q_proj.weight"``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.utils._pytree as _pt

__all__ = [
    "map", "map_with_path", "leaves", "paths", "flatten", "unflatten", "structure",
    "register_node", "get", "path_str",
]

_builtin_map = map


def _key_str(k: Any) -> str:
    if isinstance(k, _pt.SequenceKey):
        return str(k.idx)
    if isinstance(k, _pt.MappingKey):
        return str(k.key)
    if isinstance(k, _pt.GetAttrKey):
        return k.name
    return str(k)


def path_str(keypath: tuple) -> str:
    """Dotted string for a ``torch.utils._pytree`` key path."""
    return ".".join(_key_str(k) for k in keypath)


def map(f: Callable, tree: Any, *rest: Any, is_leaf: Callable | None = None) -> Any:
    """Apply ``f`` to every leaf (and the matching leaves of ``rest``); same structure out."""
    return _pt.tree_map(f, tree, *rest, is_leaf=is_leaf)


def map_with_path(f: Callable[[str, Any], Any], tree: Any, *, is_leaf: Callable | None = None) -> Any:
    """Apply ``f(path, leaf)`` to every leaf."""
    return _pt.tree_map_with_path(lambda kp, x: f(path_str(kp), x), tree, is_leaf=is_leaf)


def leaves(tree: Any, *, is_leaf: Callable | None = None) -> list:
    """All leaves, in a deterministic order."""
    return _pt.tree_leaves(tree, is_leaf=is_leaf)


def paths(tree: Any, *, is_leaf: Callable | None = None) -> list[tuple[str, Any]]:
    """``[(dotted_path, leaf), ...]`` in leaf order."""
    flat, _ = _pt.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), x) for kp, x in flat]


def flatten(tree: Any, *, is_leaf: Callable | None = None):
    """``(leaves, treedef)``."""
    return _pt.tree_flatten(tree, is_leaf=is_leaf)


def unflatten(leaves_: list, treedef) -> Any:
    return _pt.tree_unflatten(leaves_, treedef)


def structure(tree: Any, *, is_leaf: Callable | None = None):
    return _pt.tree_structure(tree, is_leaf=is_leaf)


def get(tree: Any, path: str) -> Any:
    """Look up a dotted path in nested dicts / lists."""
    node = tree
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def register_node(cls: type, children: Callable, rebuild: Callable, names: tuple[str, ...]) -> None:
    """Register a wrapper class as a pytree node.

    Args:
      cls: the class.
      children: ``obj -> (list_of_children, static_context)``.
      rebuild: ``(children, static_context) -> obj``.
      names: one attribute name per child, used in paths (``...q_proj.weight.a``).
    """
    def flatten_with_keys(obj):
        kids, ctx = children(obj)
        return [(_pt.GetAttrKey(n), c) for n, c in zip(names, kids)], ctx

    _pt.register_pytree_node(
        cls, children, rebuild, flatten_with_keys_fn=flatten_with_keys,
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
    )
