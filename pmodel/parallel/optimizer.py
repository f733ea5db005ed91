"""Layout-aware gradient norms: how each leaf's squared gradient enters the global norm.

The train step of :mod:`pmodel.parallel.plan` sums ``norm_weights``-weighted squares of the
gradient pieces a rank owns over the mesh dimensions that hold different pieces; the sharded
optimizer itself is :mod:`pmodel.parallel.zero`. :func:`grad_norm` is the same norm over whole
``.grad`` tensors, for callers outside a plan.
"""
from __future__ import annotations

import torch

from .. import tree
from ..params import is_decl
from . import comm
from .layout import layout_of
from .mesh import Mesh

__all__ = ["norm_weights", "grad_norm"]


def norm_weights(model, params) -> list[float]:
    """Per leaf (tree order) the factor its squared gradient enters the global norm with.

    ``1 / copies`` from the model's layout (:attr:`Placement.norm_weight
    <pmodel.parallel.layout.Placement.norm_weight>`): 1 for sharded leaves, ``1 / tp`` for leaves
    replicated over TP (each rank adds its copy), ``kv_heads / tp`` for replicated K/V heads;
    summing the weighted squares over the layout's ``norm_dims`` counts each scalar once.
    Without a layout every weight is 1. ``model.defs`` may be a pipeline stage's subset.
    """
    layout = layout_of(model) if model is not None else None
    leaves = tree.leaves(params)
    if layout is None:
        return [1.0] * len(leaves)
    out = [layout.norm_weight(path, decl) for path, decl in tree.paths(model.defs, is_leaf=is_decl)]
    if len(out) != len(leaves):
        raise ValueError(f"norm_weights: params have {len(leaves)} leaves, model declares {len(out)}")
    return out


def grad_norm(model, params, mesh: Mesh) -> torch.Tensor:
    """Global L2 norm of the (dp-reduced) ``.grad`` of every trainable leaf: the
    :func:`norm_weights`-weighted squares summed over the layout's ``norm_dims`` (tp, ep) and pp."""
    sq = torch.zeros((), dtype=torch.float64)
    for w, p in zip(norm_weights(model, params), tree.leaves(params)):
        if p.grad is not None:
            sq = sq + w * p.grad.detach().double().pow(2).sum()
    layout = layout_of(model) if model is not None else None
    for dim in (layout.norm_dims if layout is not None else ()) + ("pp",):
        sq = comm.all_reduce(sq, mesh.group(dim))
    return sq.sqrt().float()
