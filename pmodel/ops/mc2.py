"""Sequence-parallel tensor-parallel linears with their communication: reference and MC2 lowering.

``all_gather_linear`` is the column-parallel linear under sequence parallelism (all-gather the
sequence, then ``x @ w.T``); ``linear_reduce_scatter`` is the row-parallel one (``x @ w.T``
partial sums, then reduce-scatter the sequence). Both are autograd Functions on
``torch.distributed``; this module does not know ``pmodel.parallel``.

Lowering:
  * reference (any backend, or ``Kernels.mc2`` False): the collective and the matmul as two steps.
  * NPU with ``Kernels.mc2``: torch_npu's MC2 kernels, which overlap the two inside one kernel.
    They take 2-D inputs and gather / scatter along dim 0, so ``(B, T, D)`` activations are laid
    out sequence-major as ``(T*B, D)`` (row ``t*B + b``): rank r's sequence block is then a
    contiguous block of rows. Forward: ``npu_all_gather_base_mm`` / ``npu_mm_reduce_scatter_base``.
    Backward as MindSpeed's MC2 linears: the row-parallel input gradient is again
    ``npu_all_gather_base_mm`` (gather ``dY``, times ``w``; its gathered ``dY`` gives ``dW``); the
    column-parallel input gradient is ``dY @ w`` then a reduce-scatter collective (the fused
    ``npu_mm_reduce_scatter_base`` would need ``k = out/tp >= 256``, which GQA K/V projections
    do not meet); ``dW`` uses the all-gathered input the forward kernel returned.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .kernels import DEFAULT, Kernels, backend_for_device

__all__ = ["all_gather_linear", "linear_reduce_scatter"]

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _seq_major(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, D)`` -> ``(T*B, D)``, contiguous (row ``t*B + b``)."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


def _batch_major(y: torch.Tensor, batch: int) -> torch.Tensor:
    """``(T*B, N)`` sequence-major -> ``(B, T, N)``, contiguous."""
    return y.view(-1, batch, y.shape[-1]).transpose(0, 1).contiguous()


def _gather_rows(x: torch.Tensor, group, n: int) -> torch.Tensor:
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_rows(x: torch.Tensor, group, n: int) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


class _AllGatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, group, n, fused):
        # x: (B, T/n, D); w: (out/n, D)
        x2 = _seq_major(x)  # (T/n*B, D)
        if fused:
            from . import npu
            y2, xg = npu.all_gather_mm(x2, w, group, n)  # (T*B, out/n), (T*B, D)
        else:
            xg = _gather_rows(x2, group, n)  # (T*B, D)
            y2 = F.linear(xg, w)
        ctx.save_for_backward(xg if ctx.needs_input_grad[1] else None, w)
        ctx.group, ctx.n, ctx.batch = group, n, x.shape[0]
        return _batch_major(y2, x.shape[0])  # (B, T, out/n)

    @staticmethod
    def backward(ctx, gy):
        xg, w = ctx.saved_tensors
        g2 = _seq_major(gy)  # (T*B, out/n)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _batch_major(_reduce_scatter_rows(g2 @ w, ctx.group, ctx.n), ctx.batch)  # (B, T/n, D)
        if ctx.needs_input_grad[1]:
            dw = g2.t() @ xg  # (out/n, D)
        return dx, dw, None, None, None


class _LinearReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, group, n, fused):
        # x: (B, T, in/n); w: (out, in/n)
        x2 = _seq_major(x)  # (T*B, in/n)
        if fused:
            from . import npu
            y2 = npu.mm_reduce_scatter(x2, w, group, n)  # (T/n*B, out)
        else:
            y2 = _reduce_scatter_rows(F.linear(x2, w), group, n)
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, w)
        ctx.group, ctx.n, ctx.batch, ctx.fused = group, n, x.shape[0], fused
        return _batch_major(y2, x.shape[0])  # (B, T/n, out)

    @staticmethod
    def backward(ctx, gy):
        x2, w = ctx.saved_tensors
        g2 = _seq_major(gy)  # (T/n*B, out)
        if ctx.fused:
            from . import npu
            dx2, gg = npu.gather_mm(g2, w, ctx.group, ctx.n)  # (T*B, in/n), (T*B, out)
        else:
            gg = _gather_rows(g2, ctx.group, ctx.n)
            dx2 = gg @ w if ctx.needs_input_grad[0] else None
        dx = _batch_major(dx2, ctx.batch) if ctx.needs_input_grad[0] else None
        dw = gg.t() @ x2 if ctx.needs_input_grad[1] else None  # (out, in/n)
        return dx, dw, None, None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 1; backward reduce-scatters (for wrapper weights)."""

    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.n, ctx.batch = group, n, x.shape[0]
        return _batch_major(_gather_rows(_seq_major(x), group, n), x.shape[0])

    @staticmethod
    def backward(ctx, g):
        return _batch_major(_reduce_scatter_rows(_seq_major(g), ctx.group, ctx.n), ctx.batch), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Reduce-scatter along dim 1; backward all-gathers (for wrapper weights)."""

    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.n, ctx.batch = group, n, x.shape[0]
        return _batch_major(_reduce_scatter_rows(_seq_major(x), group, n), x.shape[0])

    @staticmethod
    def backward(ctx, g):
        return _batch_major(_gather_rows(_seq_major(g), ctx.group, ctx.n), ctx.batch), None, None


def _setup(x, group, kernels: Kernels | None, name: str):
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (B, T, D), got shape {tuple(x.shape)}")
    k = kernels or DEFAULT
    n = dist.get_world_size(group)
    fused = k.mc2 and (k.backend or backend_for_device(x.device)) == "npu"
    return (group if group is not None else dist.group.WORLD), n, fused


def all_gather_linear(x: torch.Tensor, w, group=None, *, kernels: Kernels | None = None) -> torch.Tensor:
    """Sequence-parallel column linear: all-gather ``x`` along the sequence, then ``x @ w.T``.

    Args:
      x: ``(B, T/tp, D)``, this rank's sequence block.
      w: ``(out/tp, D)``, this rank's rows; a wrapper weight (LoRA) is applied with
        :func:`pmodel.ops.linear` to the gathered input (never fused).
      group: the tensor-parallel process group (None: the default group).
      kernels: ``mc2`` on the NPU backend lowers to ``npu_all_gather_base_mm``.

    Returns:
      ``(B, T, out/tp)``. Backward: the gradient of ``x`` is reduce-scattered along the sequence;
      the gradient of ``w`` is this rank's ``dY^T @ x_gathered``.
    """
    group, n, fused = _setup(x, group, kernels, "all_gather_linear")
    if not isinstance(w, torch.Tensor):
        from . import linear
        return linear(x if n == 1 else _GatherSequence.apply(x, group, n), w, kernels=kernels)
    if n == 1:
        return F.linear(x, w)
    return _AllGatherLinear.apply(x, w, group, n, fused)


def linear_reduce_scatter(x: torch.Tensor, w, group=None, *, kernels: Kernels | None = None,
                          in_shard: tuple[int, int] | None = None) -> torch.Tensor:
    """Sequence-parallel row linear: ``x @ w.T`` partial sums, reduce-scattered along the sequence.

    Args:
      x: ``(B, T, in/tp)``, this rank's input columns over the full sequence (``T`` divisible by
        the group size).
      w: ``(out, in/tp)``, this rank's columns; a wrapper weight (LoRA) is applied with
        :func:`pmodel.ops.linear` before the reduce-scatter (never fused).
      group: the tensor-parallel process group (None: the default group).
      kernels: ``mc2`` on the NPU backend lowers to ``npu_mm_reduce_scatter_base`` (forward) and
        ``npu_all_gather_base_mm`` (backward).
      in_shard: ``(start, full_width)`` of this rank's input columns, passed to a wrapper weight
        (see :mod:`pmodel.ops.weights`); a plain tensor ignores it.

    Returns:
      ``(B, T/tp, out)``, the summed output for this rank's sequence block. Backward: the
      gradient is all-gathered along the sequence.
    """
    group, n, fused = _setup(x, group, kernels, "linear_reduce_scatter")
    if x.shape[1] % n:
        raise ValueError(f"linear_reduce_scatter: sequence length {x.shape[1]} is not divisible by {n} ranks")
    if not isinstance(w, torch.Tensor):
        from . import linear
        y = linear(x, w, kernels=kernels) if in_shard is None else linear(x, w, kernels=kernels, in_shard=in_shard)
        return y if n == 1 else _ReduceScatterSequence.apply(y, group, n)
    if n == 1:
        return F.linear(x, w)
    return _LinearReduceScatter.apply(x, w, group, n, fused)
