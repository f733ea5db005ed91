"""The distributed optimizer (ZeRO-1) and its replica (high-availability) layout.

``distributed_optimizer(tx, mesh)`` is a :class:`~pmodel.optim.GradientTransformation` again.
It keeps fp32 main parameters and the inner ``tx``'s state (Adam moments) only for this rank's
shard of every gradient bucket (:func:`pmodel.parallel.data.bucket_layout`):

1. the gradients arrive reduce-scattered over dp (``DataParallel(reduce="reduce_scatter")``):
   only this rank's shard of each bucket is read;
2. the inner ``tx`` updates the fp32 main shard;
3. the updated shards are all-gathered over the shard group and returned as
   :class:`~pmodel.optim.Assign` updates, so ``optim.apply_updates`` writes them into the
   parameters exactly (also for bf16 parameters: ``main.to(bf16)``).

**Replica mode** (``replica=True``) splits dp into two halves (``Mesh.split("dp", 2)``); each half
shards the optimizer over its ``dp / 2`` ranks, so every shard is held twice and either half can
rebuild the whole state. Gradients are all-reduced over all of dp
(``DataParallel(reduce="all_reduce")``) and the gradient norm, summed over every dp rank, is
divided by 2 because each shard was counted twice.

The inner ``tx`` sees a tree shaped like ``params`` whose leaves are this rank's flat pieces
(shape ``(1, n)`` for matrices, ``(n,)`` for vectors, so rank-based rules such as
:func:`~pmodel.optim.weight_decay_mask` classify them as for the full parameter; a leaf with no
piece on this rank is an empty tensor). It must therefore be elementwise (adamw, sgd, schedules,
masks): a global-norm clip inside it would see only the shard — pass ``max_grad_norm`` here
instead, which uses the true global norm (over dp shards, TP shards and replicas).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import tree
from ..optim import Assign, GradientTransformation, apply_updates
from ..params import is_decl
from . import comm
from .data import bucket_layout
from .mesh import Mesh
from .tensor import tp_layout

__all__ = ["DistributedState", "distributed_optimizer", "norm_weights", "grad_norm"]


class DistributedState(NamedTuple):
    main: Any         # fp32 main-parameter pieces, shaped like params (None for frozen)
    inner: Any        # the inner transform's state over those pieces
    grad_norm: torch.Tensor  # fp32: global gradient norm of the last update (before clipping)


def norm_weights(model, params) -> list[float]:
    """Per leaf (tree order) the factor its squared gradient norm enters the global norm with.

    1 for TP-sharded leaves, ``1 / tp`` for leaves replicated over TP (each rank adds its copy),
    ``kv_heads / tp`` for replicated K/V heads; summing the weighted squares over TP counts each
    scalar once. Without a TP layout every weight is 1.
    """
    layout = tp_layout(model) if model is not None else None
    leaves = tree.leaves(params)
    if layout is None:
        return [1.0] * len(leaves)
    out = []
    for path, decl in tree.paths(model.defs, is_leaf=is_decl):
        role = layout.role(path, decl)
        if role == "replicated":
            w = 1.0 / layout.tp
        elif role in ("kv_replica", "kv_replica_bias"):
            w = layout.num_kv_heads / layout.tp
        else:
            w = 1.0
        out.append(w)
    if len(out) != len(leaves):
        raise ValueError(f"norm_weights: params have {len(leaves)} leaves, model declares {len(out)}")
    return out


def grad_norm(model, params, mesh: Mesh) -> torch.Tensor:
    """Global L2 norm of the (dp-reduced) ``.grad`` of every trainable leaf, over TP and PP."""
    sq = torch.zeros((), dtype=torch.float64)
    for w, p in zip(norm_weights(model, params), tree.leaves(params)):
        if p.grad is not None:
            sq = sq + w * p.grad.detach().double().pow(2).sum()
    sq = comm.all_reduce(sq, mesh.group("tp"))
    sq = comm.all_reduce(sq, mesh.group("pp"))
    return sq.sqrt().float()


def distributed_optimizer(tx: GradientTransformation, mesh: Mesh, *, model=None, replica: bool = False,
                          bucket_numel: int = 40_000_000, max_grad_norm: float | None = None) -> GradientTransformation:
    """Shard ``tx``'s state and fp32 main parameters over the mesh's dp group (ZeRO-1).

    Args:
      tx: an elementwise inner transform (e.g. ``optim.adamw(...)``).
      mesh: the :class:`Mesh`.
      model: the (tensor-parallel) Model, for the TP-aware gradient norm; None = no TP.
      replica: the high-availability layout (two replica halves of dp, each shard held twice).
      bucket_numel: must equal the :class:`~pmodel.parallel.data.DataParallel` bucket size.
      max_grad_norm: clip by the true global gradient norm first (None = no clipping).

    Returns:
      a ``GradientTransformation``; its ``update(grads, state, params)`` returns
      :class:`~pmodel.optim.Assign` leaves (the gathered new parameter values).

    Note: ``init`` in replica mode creates process groups (collective: call it on every rank).
    """
    dp = mesh.size("dp")
    if replica:
        if dp < 2 or dp % 2:
            raise ValueError(f"replica (high-availability) optimizer needs an even dp size >= 2, got dp={dp}")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")

    def _shard_info():
        if replica:
            _, idx, _, group = mesh.split("dp", 2)
            return idx, dp // 2, group
        return mesh.rank("dp"), dp, mesh.group("dp")

    def pieces(params, layout, shard, flat_of):
        """Per leaf: the piece of ``flat_of(leaf)`` inside this rank's shard of its bucket."""
        out = []
        for i, t in enumerate(tree.leaves(params)):
            ix = layout.index[i]
            if ix is None:
                out.append(None)
                continue
            b, off, n = ix
            lo, hi = layout.shard_range(b, shard)
            a, z = max(lo, off), min(hi, off + n)
            out.append((b, a - lo, a - off, max(z - a, 0), t.dim()))
        return out

    def shaped(x: torch.Tensor, ndim: int) -> torch.Tensor:
        return x.view(1, -1) if ndim >= 2 else x

    groups: dict = {}  # this optimizer's shard group, created once (replica groups are collective)

    def init(params):
        shard, nshards, group = groups["shard"] if "shard" in groups else _shard_info()
        layout = bucket_layout(params, bucket_numel=bucket_numel, pad=nshards)
        leaves = tree.leaves(params)
        dev = next((t.device for t in leaves if isinstance(t, torch.Tensor)), None)
        flat_main = [torch.zeros(s // nshards, dtype=torch.float32, device=dev) for s in layout.sizes]
        info = pieces(params, layout, shard, None)
        main_leaves = []
        for t, pc in zip(leaves, info):
            if pc is None:
                main_leaves.append(None)
                continue
            b, in_shard, in_leaf, n, nd = pc
            view = flat_main[b][in_shard:in_shard + n]
            view.copy_(t.detach().reshape(-1)[in_leaf:in_leaf + n].float())
            main_leaves.append(shaped(view, nd))
        main = tree.unflatten(main_leaves, tree.structure(params))
        groups["shard"] = (shard, nshards, group)
        return DistributedState(main=main, inner=tx.init(main), grad_norm=torch.zeros((), dtype=torch.float32))

    def update(grads, state: DistributedState, params=None):
        if params is None:
            raise ValueError("distributed_optimizer.update needs params (to write the gathered values)")
        if "shard" not in groups:
            groups["shard"] = _shard_info()
        shard, nshards, group = groups["shard"]
        layout = bucket_layout(params, bucket_numel=bucket_numel, pad=nshards)
        info = pieces(params, layout, shard, None)
        g_leaves = tree.leaves(grads, is_leaf=lambda x: x is None)
        main_leaves = tree.leaves(state.main, is_leaf=lambda x: x is None)
        weights = norm_weights(model, params)
        g_pieces, sq = [], torch.zeros((), dtype=torch.float64)
        for g, pc, w in zip(g_leaves, info, weights):
            if pc is None or g is None:
                g_pieces.append(None if pc is None else shaped(torch.zeros(pc[3]), pc[4]))
                continue
            b, in_shard, in_leaf, n, nd = pc
            piece = g.detach().reshape(-1)[in_leaf:in_leaf + n].float()
            sq = sq + w * piece.double().pow(2).sum()
            g_pieces.append(shaped(piece, nd))
        # Shards are disjoint over dp (replica: each is held twice); TP / PP hold different leaves.
        sq = comm.all_reduce(sq, mesh.group("dp"))
        if replica:
            sq = sq / 2
        sq = comm.all_reduce(comm.all_reduce(sq, mesh.group("tp")), mesh.group("pp"))
        norm = sq.sqrt().float()
        if max_grad_norm is not None:
            coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
            g_pieces = [None if x is None else x * coef for x in g_pieces]
        g_tree = tree.unflatten(g_pieces, tree.structure(params))
        updates, inner = tx.update(g_tree, state.inner, state.main)
        apply_updates(state.main, updates)  # fp32 main pieces, in place (views of the flat shards)
        # All-gather every bucket's updated shard (in the parameter dtype) over the shard group.
        out = [None] * len(info)
        p_leaves = tree.leaves(params)
        for b, members in enumerate(layout.members):
            dtype = p_leaves[members[0]].dtype
            lo, hi = layout.shard_range(b, shard)
            flat = torch.zeros(hi - lo, dtype=dtype, device=p_leaves[members[0]].device)
            for i in members:
                _, in_shard, _, n, _ = info[i]
                if n:
                    flat[in_shard:in_shard + n] = main_leaves[i].reshape(-1).to(dtype)
            full = comm.all_gather(flat, group, 0)  # (bucket_size,)
            for i in members:
                _, off, n = layout.index[i]
                out[i] = Assign(full[off:off + n].view_as(p_leaves[i]))
        return tree.unflatten(out, tree.structure(params)), DistributedState(main=state.main, inner=inner,
                                                                            grad_norm=norm.detach())

    return GradientTransformation(init, update)
