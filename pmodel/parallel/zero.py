"""The distributed optimizer (ZeRO-1) and its replica (high-availability) layout.

The gradients live in flat buckets (:class:`~pmodel.parallel.data.DataParallel`), padded to a
multiple of the shard count. :class:`ShardSpec` says which contiguous range of every bucket this
rank owns; :func:`distributed_optimizer` keeps fp32 main parameters and the inner optimizer's
state (Adam moments) only for that range:

1. the gradients arrive reduce-scattered over dp (``DataParallel(reduce="reduce_scatter")``);
   :meth:`ShardSpec.pieces` cuts this rank's pieces out of them (fp32 copies, small);
2. the train step (:mod:`pmodel.parallel.plan`) measures the global norm over those pieces, clips
   and unscales them: the one norm-and-clip tail of every layout;
3. the inner ``tx`` updates the fp32 main pieces;
4. the updated pieces are all-gathered over the shard group and returned as
   :class:`~pmodel.optim.Assign` updates, so ``optim.apply_updates`` writes them into the
   parameters exactly (also for bf16 parameters: ``main.to(bf16)``).

**Replica mode** (``replica=True``) splits dp into two halves (``Mesh.split("dp", 2)``); each half
shards the optimizer over its ``dp / 2`` ranks, so every shard is held twice and either half can
rebuild the whole state. Gradients are then all-reduced over all of dp.

The inner ``tx`` sees a tree shaped like ``params`` whose leaves are this rank's flat pieces
(shape ``(1, n)`` for matrices, ``(n,)`` for vectors, so rank-based rules such as
:func:`~pmodel.optim.weight_decay_mask` classify them as for the full parameter; a leaf with no
piece on this rank is an empty tensor). It must therefore be elementwise (adamw, sgd, schedules,
masks); a global-norm clip belongs to the plan (``max_grad_norm``), which sees the true norm.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch

from .. import tree
from ..optim import Assign, GradientTransformation, apply_updates
from . import comm
from .data import BucketLayout, bucket_layout
from .mesh import Mesh

__all__ = ["DistributedState", "ShardSpec", "shard_spec", "distributed_optimizer"]


class DistributedState(NamedTuple):
    main: Any   # fp32 main-parameter pieces, shaped like params (None for frozen leaves)
    inner: Any  # the inner transform's state over those pieces


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ShardSpec:
    """Which part of every gradient bucket this rank's optimizer owns.

    Attributes:
      shard, nshards: this rank's shard index and the shard count (dp, or dp / 2 for replicas).
      group: the process group the shards are gathered over (None: one shard).
      replica: the high-availability layout (every shard held by two dp ranks).
      bucket_numel: the bucket size (must equal the :class:`DataParallel` one; the plan passes
        the same value to both).
    """

    shard: int
    nshards: int
    group: Any
    replica: bool
    bucket_numel: int

    def layout(self, params) -> BucketLayout:
        return bucket_layout(params, bucket_numel=self.bucket_numel, pad=self.nshards)

    def ranges(self, params) -> list:
        """Per leaf (tree order): ``(bucket, offset_in_shard, offset_in_leaf, n, ndim)`` of the
        piece this rank owns, or None for a frozen leaf (``n`` may be 0)."""
        layout = self.layout(params)
        out = []
        for i, t in enumerate(tree.leaves(params)):
            ix = layout.index[i]
            if ix is None:
                out.append(None)
                continue
            b, off, n = ix
            lo, hi = layout.shard_range(b, self.shard)
            a, z = max(lo, off), min(hi, off + n)
            out.append((b, a - lo, a - off, max(z - a, 0), t.dim()))
        return out

    def pieces(self, grads, params) -> Any:
        """This rank's fp32 pieces of ``grads`` (a tree shaped like params; None = frozen)."""
        out = []
        for g, pc in zip(tree.leaves(grads, is_leaf=lambda x: x is None), self.ranges(params)):
            if pc is None:
                out.append(None)
                continue
            _, _, in_leaf, n, nd = pc
            if g is None:
                piece = torch.zeros(n, dtype=torch.float32)
            else:
                piece = g.detach().reshape(-1)[in_leaf:in_leaf + n].float()
            out.append(_shaped(piece, nd))
        return tree.unflatten(out, tree.structure(params))


def _shaped(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.view(1, -1) if ndim >= 2 else x


def shard_spec(mesh: Mesh, *, replica: bool = False, bucket_numel: int = 40_000_000) -> ShardSpec:
    """The shard this rank owns (collective in replica mode: it creates the replica groups).

    Raises:
      ValueError: replica mode without an even dp size >= 2.
    """
    dp = mesh.size("dp")
    if replica:
        if dp < 2 or dp % 2:
            raise ValueError(f"replica (high-availability) optimizer needs an even dp size >= 2, got dp={dp}")
        _, idx, _, group = mesh.split("dp", 2)
        return ShardSpec(shard=idx, nshards=dp // 2, group=group, replica=True, bucket_numel=bucket_numel)
    return ShardSpec(shard=mesh.rank("dp"), nshards=dp, group=mesh.group("dp"), replica=False,
                     bucket_numel=bucket_numel)


def distributed_optimizer(tx: GradientTransformation, spec: ShardSpec) -> GradientTransformation:
    """Shard ``tx``'s state and fp32 main parameters over the data-parallel ranks (ZeRO-1).

    Args:
      tx: an elementwise inner transform (e.g. ``optim.adamw(...)``).
      spec: this rank's :class:`ShardSpec` (:func:`shard_spec`).

    Returns:
      a ``GradientTransformation`` whose ``update(pieces, state, params)`` takes this rank's
      gradient pieces (:meth:`ShardSpec.pieces`, already clipped / unscaled) and returns
      :class:`~pmodel.optim.Assign` leaves (the gathered new parameter values).
    """
    def init(params):
        layout = spec.layout(params)
        leaves = tree.leaves(params)
        dev = next((t.device for t in leaves if isinstance(t, torch.Tensor)), None)
        flat_main = [torch.zeros(s // spec.nshards, dtype=torch.float32, device=dev) for s in layout.sizes]
        main_leaves = []
        for t, pc in zip(leaves, spec.ranges(params)):
            if pc is None:
                main_leaves.append(None)
                continue
            b, in_shard, in_leaf, n, nd = pc
            view = flat_main[b][in_shard:in_shard + n]
            view.copy_(t.detach().reshape(-1)[in_leaf:in_leaf + n].float())
            main_leaves.append(_shaped(view, nd))
        main = tree.unflatten(main_leaves, tree.structure(params))
        return DistributedState(main=main, inner=tx.init(main))

    def update(pieces, state: DistributedState, params=None):
        if params is None:
            raise ValueError("distributed_optimizer.update needs params (to write the gathered values)")
        layout = spec.layout(params)
        info = spec.ranges(params)
        updates, inner = tx.update(pieces, state.inner, state.main)
        apply_updates(state.main, updates)  # fp32 main pieces, in place
        main_leaves = tree.leaves(state.main, is_leaf=lambda x: x is None)
        p_leaves = tree.leaves(params)
        out = [None] * len(info)
        # All-gather every bucket's updated shard (in the parameter dtype) over the shard group.
        for b, members in enumerate(layout.members):
            dtype, device = p_leaves[members[0]].dtype, p_leaves[members[0]].device
            lo, hi = layout.shard_range(b, spec.shard)
            flat = torch.zeros(hi - lo, dtype=dtype, device=device)
            for i in members:
                _, in_shard, _, n, _ = info[i]
                if n:
                    flat[in_shard:in_shard + n] = main_leaves[i].reshape(-1).to(dtype)
            full = comm.all_gather(flat, spec.group, 0)  # (bucket_size,)
            for i in members:
                _, off, n = layout.index[i]
                out[i] = Assign(full[off:off + n].view_as(p_leaves[i]))
        return tree.unflatten(out, tree.structure(params)), DistributedState(main=state.main, inner=inner)

    return GradientTransformation(init, update)
