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
