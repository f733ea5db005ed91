"""CUDA lowering: fused torch kernels where they exist; everything else is the reference.

Fused here: ``rms_norm`` (``F.rms_norm``, one kernel; ``Kernels.fused_norm``) and ``attention``
(SDPA, which selects flash / memory-efficient / cuDNN; ``Kernels.fused_attention``). SwiGLU and
rotary have no fused CUDA kernel in pmodel: they always use the reference torch ops, and
``pmodel.ops.kernels_for`` refuses to ask for them on this backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    # F.rms_norm is one fused kernel on CUDA (torch >= 2.4); fp32 compute then cast, as the reference.
    w = weight.float() + offset if offset else weight.float()
    if offset:
        return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)
    y = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return weight * y



def attention(q, k, v, *, mask=None, causal=False, bias=None, scale=None, cu_seqlens=None, window=None):
    """SDPA (flash / memory-efficient / cuDNN, chosen by torch); the packing and window hints
    are already expressed by ``mask``."""
    return reference.attention(q, k, v, mask=mask, causal=causal, bias=bias, scale=scale)


# ----------------------------------------------------------------------------- MoE (Kernels.fused_moe)
def _grouped_mm_ok(xs: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm takes fp32 / bf16 / fp16 with 16-byte aligned row strides."""
    if not hasattr(torch, "_grouped_mm") or xs.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    es = xs.element_size()
    return w.dtype == xs.dtype and (w.shape[1] * es) % 16 == 0 and (w.shape[2] * es) % 16 == 0


class _GroupedMM(torch.autograd.Function):
    """``y_e = x_e @ w[e].T`` with one grouped GEMM each way (forward, dx, dw)."""

    @staticmethod
    def forward(ctx, xs, w, offs):
        ctx.save_for_backward(xs, w, offs)
        return torch._grouped_mm(xs, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        xs, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w, offs=offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(dy.t(), xs, offs=offs) if ctx.needs_input_grad[1] else None  # (E, out, in)
        return dx, dw, None


def grouped_linear(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-expert ``xs_e @ w[e].T`` as one ``torch._grouped_mm`` (reference when the dtype or the
    widths do not meet its alignment)."""
    if not _grouped_mm_ok(xs, w):
        from .moe import grouped_linear as ref
        return ref(xs, w, counts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return _GroupedMM.apply(xs.contiguous(), w, offs)
