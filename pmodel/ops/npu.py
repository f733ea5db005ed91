"""Ascend NPU lowering through torch_npu's fused kernels (``torch.ops.npu.*``).

This module never imports torch_npu: on an NPU machine the user (or torch's device-backend
autoload) has imported it, which registers the ``npu`` op namespace used here. Tests exercise
the lowering on CPU by registering stand-in ops with the same names, schemas and documented
semantics (see tests/npu_standins.py); the library itself has no fallback magic.

Semantics followed (torch_npu 2.x documentation):
  * ``npu_rms_norm(x, gamma, epsilon) -> (y, rstd)``.
  * ``npu_swiglu(x, dim=-1)``: silu of the first half of ``x`` times the second half.
  * ``npu_rotary_mul(x, r1, r2, rotary_mode)``: ``x * r1 + rotate(x) * r2`` with full-width
    cos/sin tables; ``'half'`` is rotate-half, ``'interleave'`` rotates adjacent pairs.
  * ``npu_fusion_attention(q, k, v, head_num, input_layout, ..., atten_mask, scale, ...,
    sparse_mode)``: ``atten_mask`` True = masked out; the scale must be passed explicitly
    (1/sqrt(d)); GQA when k/v carry fewer heads; returns a tuple whose first item is the output.
  * MC2 (``Kernels.mc2``): ``npu_all_gather_base_mm(self, x2, hcom, world_size, *, bias=None,
    x1_scale=None, x2_scale=None, gather_index=0, gather_output=True, comm_turn=0,
    output_dtype=None, comm_mode=None) -> (allgather(self) @ x2, allgather(self))`` and
    ``npu_mm_reduce_scatter_base(self, x2, hcom, world_size, *, reduce_op='sum', bias=None,
    x1_scale=None, x2_scale=None, comm_turn=0, output_dtype=None, comm_mode=None) ->
    reducescatter(self @ x2)``: 2-D ``(m, k) @ (k, n)``, gather / scatter along dim 0, ``x2`` may
    be a transposed view but ``self`` may not; fp16/bf16 only, ``k`` in [256, 65535),
    ``world_size`` in {2, 4, 8} (A2) or up to 32 (A3), ``m`` divisible by ``world_size`` for the
    reduce-scatter. ``hcom`` is the HCCL communicator name of the process group (see
    :func:`hccl_comm_name`). Only the arguments up to ``comm_turn`` are passed, so older torch_npu
    versions with the shorter schema work too.
"""
from __future__ import annotations

import math

import torch


def _npu():
    return torch.ops.npu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    if offset:  # Gemma's (1 + w) has no fused variant; the kernel takes the effective gamma
        y, _ = _npu().npu_rms_norm(x.float(), weight.float() + offset, eps)
        return y.to(x.dtype)
    y, _ = _npu().npu_rms_norm(x, weight, eps)
    return y


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _npu().npu_swiglu(torch.cat((gate, up), dim=-1), -1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    # x: (B, T, H, Dh); cos/sin: (B, T, R/2) -> full-width (B, T, 1, R) tables for the kernel
    R = 2 * cos.shape[-1]
    if interleaved:
        c, s = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    else:
        c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    c, s = c[:, :, None, :].to(x.dtype), s[:, :, None, :].to(x.dtype)
    mode = "interleave" if interleaved else "half"
    rot = x[..., :R].contiguous()
    out = _npu().npu_rotary_mul(rot, c, s, mode)
    return torch.cat((out, x[..., R:]), -1) if R < x.shape[-1] else out


def attention(q, k, v, *, mask=None, causal=False, bias=None, scale=None, cu_seqlens=None, window=None):
    """Fused attention in BSND layout.

    Plain causal attention uses ``sparse_mode=2`` (lower-right-aligned causal, compressed
    2048x2048 mask as the kernel requires); any other mask (padding, documents, window, cache
    decoding) is passed densely with ``sparse_mode=0``. ALiBi goes through ``pse``.
    """
    B, T, Hq, D = q.shape
    sc = scale if scale is not None else 1.0 / math.sqrt(D)
    pse = bias.to(q.dtype) if bias is not None else None
    if mask is None and causal:
        # The kernel's compressed causal mask: a fixed 2048x2048 upper triangle (True = masked).
        atten_mask = torch.ones(2048, 2048, dtype=torch.bool, device=q.device).triu(1)
        sparse = 2
    elif mask is None:
        atten_mask, sparse = None, 0
    else:
        atten_mask, sparse = ~mask, 0  # torch_npu: True = masked out
    out = _npu().npu_fusion_attention(q, k, v, Hq, "BSND", pse=pse, atten_mask=atten_mask, scale=sc,
                                      sparse_mode=sparse)
    return out[0]


# ----------------------------------------------------------------------------- MC2 (TP linear + comm)
def hccl_comm_name(group, device: torch.device) -> str:
    """The HCCL communicator name of ``group`` that the MC2 kernels take as ``hcom``.

    The documented torch_npu call (as in MindSpeed's MC2 linears):
    ``group._get_backend(device).get_hccl_comm_name(global_rank)``, with ``device`` the NPU
    device of the tensors. Any process-group backend that implements ``get_hccl_comm_name``
    satisfies it (the CPU tests register a gloo-based stand-in backend that does).
    """
    import torch.distributed as dist

    backend = group._get_backend(device)
    fn = getattr(backend, "get_hccl_comm_name", None)
    if fn is None:
        raise ValueError(f"Kernels(mc2=True) needs an HCCL process group for {device.type} tensors; "
                         f"this group's backend is {type(backend).__name__}")
    return fn(dist.get_rank())


def all_gather_mm(x: torch.Tensor, w: torch.Tensor, group, world_size: int):
    """``(allgather(x) @ w.T, allgather(x))`` for 2-D ``x (m, k)``, ``w (n, k)``: one MC2 kernel."""
    out, gathered = _npu().npu_all_gather_base_mm(x, w.t(), hccl_comm_name(group, x.device), world_size,
                                                  gather_index=0, gather_output=True, comm_turn=0)
    return out, gathered


def mm_reduce_scatter(x: torch.Tensor, w: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """``reducescatter(x @ w.T)`` along dim 0 for 2-D ``x (m, k)``, ``w (n, k)``: one MC2 kernel."""
    return _npu().npu_mm_reduce_scatter_base(x, w.t(), hccl_comm_name(group, x.device), world_size,
                                             reduce_op="sum", comm_turn=0)


def gather_mm(g: torch.Tensor, w: torch.Tensor, group, world_size: int):
    """``(allgather(g) @ w, allgather(g))`` for 2-D ``g (m, n)``, ``w (n, k)`` (the row-parallel
    backward: ``w`` is used untransposed, as MindSpeed does)."""
    out, gathered = _npu().npu_all_gather_base_mm(g, w, hccl_comm_name(group, g.device), world_size,
                                                  gather_index=0, gather_output=True, comm_turn=0)
    return out, gathered


# ----------------------------------------------------------------------------- MoE (Kernels.fused_moe)
# torch_npu's MoE routing ops (torch_npu 2.1+ documentation):
#   npu_moe_init_routing(x (N, H), row_idx (N, k) int32, expert_idx (N, k) int32, active_num)
#     -> (expanded_x (N*k, H), expanded_row_idx (N*k,) int32, expanded_expert_idx (N*k,) int32):
#     the pairs sorted by expert (ties by row_idx); expanded_x[d] = x[src % N] for the pair whose
#     row_idx value is src, and expanded_row_idx[src] = d (source -> destination row).
#     pmodel passes row_idx[t, j] = j * N + t, the layout the finalize op indexes with.
#   npu_moe_compute_expert_tokens(sorted_expert_idx, num_expert) -> (E,) int32 cumulative counts.
#   npu_grouped_matmul(x: list, weight: list, *, ..., group_list, split_item, group_type,
#     group_list_type) -> list: with split_item=3, group_type=0, group_list_type=0 (cumulative):
#     y[rows of group e] = x[rows of group e] @ weight[0][e], weight (E, in, out).
#   npu_moe_finalize_routing(expanded_permuted_rows, skip1, skip2, bias, scales,
#     expanded_src_to_dst_row, export_for_source_row) -> (N, H):
#     out[t] = skip1[t] (+ skip2[t]) + sum_j scales[t, j] * (rows[src_to_dst[j * N + t]] + bias[experts[t, j]]).
# None of these has a backward in every torch_npu version, so each forward kernel sits in an
# autograd Function whose backward is the transposed permutation / grouped matmul.
# Capacity mode: the routing kernel has no per-expert capacity, so dropped pairs are still sent
# through their expert and combined with scale 0 (the same values and gradients as dropping them;
# no compute saved). ``Routed.counts`` then counts every pair.

class _InitRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, experts):
        N, k = experts.shape
        row_idx = torch.arange(N * k, dtype=torch.int32, device=x.device).view(k, N).t().contiguous()
        xs, src_to_dst, sorted_e = _npu().npu_moe_init_routing(x, row_idx, experts.to(torch.int32), N)
        src_to_dst = src_to_dst.long()
        dst_to_src = torch.empty_like(src_to_dst)
        dst_to_src[src_to_dst] = torch.arange(N * k, device=x.device)
        ctx.save_for_backward(dst_to_src % N)
        ctx.num_tokens = N
        ctx.mark_non_differentiable(src_to_dst, sorted_e)
        return xs, src_to_dst, sorted_e

    @staticmethod
    def backward(ctx, dxs, _a, _b):
        (token,) = ctx.saved_tensors
        return dxs.new_zeros(ctx.num_tokens, dxs.shape[-1]).index_add_(0, token, dxs), None


class _FinalizeRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys, scales, src_to_dst, experts):
        N, k = scales.shape
        skip1 = ys.new_zeros(N, ys.shape[-1])
        bias = ys.new_zeros(int(experts.max()) + 1 if experts.numel() else 1, ys.shape[-1])
        out = _npu().npu_moe_finalize_routing(ys, skip1, None, bias, scales.to(ys.dtype), src_to_dst.to(torch.int32),
                                              experts.to(torch.int32))
        ctx.save_for_backward(ys, scales, src_to_dst)
        return out

    @staticmethod
    def backward(ctx, g):
        ys, scales, src_to_dst = ctx.saved_tensors
        N, k = scales.shape
        dst = src_to_dst.view(k, N).t()                                  # (N, k) row of each pair
        rows = ys[dst]                                                   # (N, k, H)
        d_scales = (rows.float() * g.unsqueeze(1).float()).sum(-1)      # (N, k)
        d_ys = ys.new_zeros(ys.shape)
        d_ys[dst.reshape(-1)] = (g.unsqueeze(1) * scales.unsqueeze(-1).to(g.dtype)).reshape(N * k, -1)
        return d_ys, d_scales.to(scales.dtype), None, None


def moe_dispatch(x: torch.Tensor, experts: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None):
    """``npu_moe_init_routing`` + ``npu_moe_compute_expert_tokens`` (see the notes above)."""
    from .moe import Routed
    xs, src_to_dst, sorted_e = _InitRouting.apply(x, experts)
    ends = _npu().npu_moe_compute_expert_tokens(sorted_e, num_experts).long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    N, k = experts.shape
    dropped = (~keep).sum() if keep is not None else torch.zeros((), dtype=torch.long, device=x.device)
    return xs, Routed(order=torch.empty(0, dtype=torch.long, device=x.device), counts=counts, num_tokens=N,
                      top_k=k, dropped=dropped, keep=keep, src_to_dst=src_to_dst, experts=experts)


def moe_combine(ys: torch.Tensor, weights: torch.Tensor, routed) -> torch.Tensor:
    """``npu_moe_finalize_routing`` with the router weights (zero for dropped pairs) as scales."""
    scales = weights if routed.keep is None else weights * routed.keep.to(weights.dtype)
    return _FinalizeRouting.apply(ys, scales, routed.src_to_dst, routed.experts)


class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, w, group_list):
        ctx.save_for_backward(xs, w, group_list)
        return _npu().npu_grouped_matmul([xs], [w.transpose(1, 2)], group_list=group_list, split_item=3,
                                         group_type=0, group_list_type=0)[0]

    @staticmethod
    def backward(ctx, dy):
        xs, w, group_list = ctx.saved_tensors
        dx = _npu().npu_grouped_matmul([dy.contiguous()], [w], group_list=group_list, split_item=3,
                                       group_type=0, group_list_type=0)[0]
        # dw[e] = dy_e^T x_e, one small matmul per expert (the K-grouped kernel variant is not in
        # every torch_npu version)
        sizes = torch.diff(group_list, prepend=group_list.new_zeros(1)).tolist()
        dw = torch.stack([a.t() @ b for a, b in zip(dy.split(sizes), xs.split(sizes))]).to(w.dtype)
        return dx, dw, None


def grouped_linear(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-expert ``xs_e @ w[e].T`` as one ``npu_grouped_matmul`` (weights passed ``(E, in, out)``)."""
    return _GroupedMatmul.apply(xs, w, torch.cumsum(counts, 0))
