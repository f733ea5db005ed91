"""Ops with per-backend lowering.

Each public op picks an implementation from the tensor's device type (or ``kernels.backend``)
and the :class:`Kernels` policy passed in: the NPU backend lowers to torch_npu fused kernels,
the CUDA backend to fused torch kernels, everything else to :mod:`pmodel.ops.reference`.
A backend implements only what it can fuse; the rest falls back to the reference.

``linear``, ``embedding`` and ``linear_cross_entropy`` also dispatch on the *weight type*: a
wrapper leaf (LoRA, column/row/vocab parallel) implements the op itself, which lets parallel
wrappers own their communication and LoRA fold its low-rank term in without materialising
``W + BA``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from .fused_ce import linear_cross_entropy as _chunked_linear_ce
from .kernels import DEFAULT, Kernels
from .reference import IGNORE_INDEX, alibi_bias, alibi_slopes, attention_mask, rope_cos_sin, rope_inv_freq

__all__ = [
    "Kernels", "IGNORE_INDEX", "linear", "embedding", "rms_norm", "layer_norm", "rotary",
    "attention", "attention_mask", "swiglu", "geglu", "gelu", "cross_entropy",
    "linear_cross_entropy", "rope_inv_freq", "rope_cos_sin", "alibi_slopes", "alibi_bias",
    "backend_name",
]


def backend_name(x: torch.Tensor, kernels: Kernels | None) -> str:
    """The backend an op on ``x`` uses under ``kernels``."""
    k = kernels or DEFAULT
    if k.backend is not None:
        return k.backend
    return {"cuda": "cuda", "npu": "npu"}.get(x.device.type, "reference")


def _impl(name: str, x: torch.Tensor, kernels: Kernels | None):
    b = backend_name(x, kernels)
    if b == "cuda":
        from . import cuda as mod
    elif b == "npu":
        from . import npu as mod
    else:
        return getattr(reference, name)
    return getattr(mod, name, None) or getattr(reference, name)


# ----------------------------------------------------------------------------- weight-typed ops
def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, kernels: Kernels | None = None) -> torch.Tensor:
    """``x @ w.T + bias``; ``w`` may be a plain ``[out, in]`` tensor or a wrapper leaf."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return w.linear(x, bias, kernels=kernels)


def embedding(tokens: torch.Tensor, w, *, kernels: Kernels | None = None) -> torch.Tensor:
    """Row lookup ``w[tokens]``; ``w`` may be a wrapper (vocab parallel)."""
    if isinstance(w, torch.Tensor):
        return F.embedding(tokens, w)
    return w.embedding(tokens, kernels=kernels)


def linear_cross_entropy(h: torch.Tensor, w, labels: torch.Tensor, weights: torch.Tensor, *,
                         kernels: Kernels | None = None):
    """Weighted cross-entropy of ``linear(h, w)`` against ``labels``.

    Returns ``(weighted_sum, per_token_losses)`` (see :func:`pmodel.ops.fused_ce.linear_cross_entropy`).
    Uses the chunked fused kernel when ``kernels.fused_cross_entropy`` (never materialises the
    full logits), the plain path otherwise; wrapper weights (vocab parallel) implement it.
    """
    k = kernels or DEFAULT
    if not isinstance(w, torch.Tensor):
        if hasattr(w, "linear_cross_entropy"):
            return w.linear_cross_entropy(h, labels, weights, kernels=k)
    elif k.fused_cross_entropy:
        return _chunked_linear_ce(h, w, labels, weights)
    per_tok = cross_entropy(linear(h, w, kernels=k), labels)
    return (per_tok * weights).sum(), per_tok.detach()


# ----------------------------------------------------------------------------- device-dispatched ops
def rms_norm(x, weight, eps: float, offset: float = 0.0, *, kernels: Kernels | None = None):
    return _impl("rms_norm", x, kernels)(x, weight, eps, offset)


def layer_norm(x, weight, bias, eps: float, *, kernels: Kernels | None = None):
    return _impl("layer_norm", x, kernels)(x, weight, bias, eps)


def rotary(x, cos, sin, *, interleaved: bool = False, kernels: Kernels | None = None):
    return _impl("rotary", x, kernels)(x, cos, sin, interleaved=interleaved)


def attention(q, k, v, *, mask=None, causal=False, bias=None, scale=None, cu_seqlens=None,
              window=None, kernels: Kernels | None = None):
    """See :func:`pmodel.ops.reference.attention`. ``cu_seqlens`` / ``window`` are hints a
    fused backend may use instead of the dense ``mask`` (the reference uses ``mask``)."""
    fn = _impl("attention", q, kernels)
    if fn is reference.attention:
        return fn(q, k, v, mask=mask, causal=causal, bias=bias, scale=scale)
    return fn(q, k, v, mask=mask, causal=causal, bias=bias, scale=scale, cu_seqlens=cu_seqlens, window=window)


def swiglu(gate, up, *, kernels: Kernels | None = None):
    return _impl("swiglu", gate, kernels)(gate, up)


def geglu(gate, up, *, kernels: Kernels | None = None):
    return _impl("geglu", gate, kernels)(gate, up)


def gelu(x, *, approximate: str = "tanh", kernels: Kernels | None = None):
    return _impl("gelu", x, kernels)(x, approximate)


def cross_entropy(logits, labels, ignore_index: int = IGNORE_INDEX, *, kernels: Kernels | None = None):
    return reference.cross_entropy(logits, labels, ignore_index)
