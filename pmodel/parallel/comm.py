"""Autograd-aware collectives for tensor and sequence parallelism.

Each function is a pair (forward collective, backward collective) that are adjoint to each
other, as in Megatron's ``mappings``:

=============================  ==========================  ==========================
function                       forward                     backward
=============================  ==========================  ==========================
``copy_to_tp``                 identity                    all-reduce
``reduce_from_tp``             all-reduce                  identity
``gather_from_tp``             all-gather (last dim)       split (keep own slice)
``scatter_to_sequence``        split (keep own slice)      all-gather
``gather_from_sequence``       all-gather                  reduce-scatter (or split)
``reduce_scatter_to_sequence`` reduce-scatter              all-gather
``all_to_all``                 all-to-all                  inverse all-to-all
=============================  ==========================  ==========================

A ``group`` of None means a single rank: every function is then the identity, so parallel
wrappers built for ``tp == 1`` cost nothing. The sequence dimension is ``dim=1`` for the
``(B, T, D)`` activations of :mod:`pmodel.model`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "group_size", "group_rank", "all_reduce", "all_gather", "reduce_scatter",
    "copy_to_tp", "reduce_from_tp", "gather_from_tp", "scatter_to_sequence",
    "gather_from_sequence", "reduce_scatter_to_sequence", "all_to_all",
]


# torch 2.13 renamed the tensor-in/tensor-out collectives; keep working on older releases.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ----------------------------------------------------------------------------- raw (no autograd)
def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or ``op``) of ``x`` over ``group``, into a new tensor."""
    if group is None:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
    n = group_size(group)
    if n == 1:
        return x
    dim = dim % x.dim()
    # all_gather_into_tensor stacks along dim 0: gather there, then move the rank axis into place.
    xt = x.movedim(dim, 0).contiguous()  # (S, ...)
    out = torch.empty((n * xt.shape[0],) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, xt, group=group)
    return out.movedim(0, dim)


def reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over ``group``, keep this rank's slice of ``dim`` (which must divide evenly)."""
    n = group_size(group)
    if n == 1:
        return x
    dim = dim % x.dim()
    if x.shape[dim] % n:
        raise ValueError(f"reduce_scatter: size {x.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    xt = x.movedim(dim, 0).contiguous()  # (n*S, ...)
    out = torch.empty((xt.shape[0] // n,) + tuple(xt.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, xt, group=group)
    return out.movedim(0, dim)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"split: size {x.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


# ----------------------------------------------------------------------------- autograd pairs
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return _split(g, ctx.group, ctx.dim), None, None


class _ScatterToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _GatherFromSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, reduce_grad):
        ctx.group, ctx.dim, ctx.reduce_grad = group, dim, reduce_grad
        return all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduce_grad:
            return reduce_scatter(g, ctx.group, ctx.dim), None, None, None
        return _split(g, ctx.group, ctx.dim), None, None, None


class _ReduceScatterToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.sd, ctx.gd = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g, ctx.group, ctx.gd, ctx.sd), None, None, None


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    sd, gd = scatter_dim % x.dim(), gather_dim % x.dim()
    if x.shape[sd] % n:
        raise ValueError(f"all_to_all: size {x.shape[sd]} of scatter dim {sd} is not divisible by {n} ranks")
    # Chunk i of the scatter dim goes to rank i; received chunks are stacked in rank order.
    send = torch.stack(x.chunk(n, dim=sd), dim=0).contiguous()  # (n, ...chunk)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gd)


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a TP region: identity forward, all-reduce of the gradient backward."""
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a TP region: all-reduce the partial sums forward, identity backward."""
    return x if group is None else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """All-gather a TP-sharded output along ``dim`` (forward); keep own slice of the gradient."""
    return x if group is None else _GatherFromTP.apply(x, group, dim)


def scatter_to_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Keep this rank's slice of the sequence (forward); all-gather the gradient (backward)."""
    return x if group is None else _ScatterToSeq.apply(x, group, dim)


def gather_from_sequence(x: torch.Tensor, group, dim: int = 1, *, reduce_grad: bool = True) -> torch.Tensor:
    """All-gather sequence shards (forward).

    Backward reduce-scatters when the gathered tensor feeds a TP region (each rank holds a
    partial gradient, ``reduce_grad=True``), or just keeps its slice when every rank's gradient is
    already complete (``reduce_grad=False``).
    """
    return x if group is None else _GatherFromSeq.apply(x, group, dim, reduce_grad)


def reduce_scatter_to_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sum TP partial outputs and keep this rank's sequence shard (forward); all-gather backward."""
    return x if group is None else _ReduceScatterToSeq.apply(x, group, dim)


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``scatter_dim`` across ranks and concatenate what arrives along ``gather_dim``.

    Backward is the inverse all-to-all (scatter ``gather_dim``, gather ``scatter_dim``).
    """
    return x if group is None else _AllToAll.apply(x, group, scatter_dim, gather_dim)
