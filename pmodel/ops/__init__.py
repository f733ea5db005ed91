"""Ops with per-backend lowering.

Each public op picks an implementation from the tensor's device type (or ``kernels.backend``)
and the :class:`Kernels` policy passed in: the NPU backend lowers to torch_npu fused kernels,
the CUDA backend to fused torch kernels, everything else to :mod:`pmodel.ops.reference`.
A backend implements only what it can fuse; the rest falls back to the reference. Each
``Kernels`` field switches one fusion off (unfused implementation) or on (the backend's kernel,
where it has one); :func:`implementation` tells which function an op would run, and
:func:`kernels_for` builds a policy from run flags, refusing fusions the backend lacks.

``linear``, ``embedding`` and ``linear_cross_entropy`` also dispatch on the *weight type*: a
wrapper leaf (LoRA, column/row/vocab parallel) implements the op itself, which lets parallel
wrappers own their communication and LoRA fold its low-rank term in without materialising
``W + BA``. What a wrapper implements is written down in :mod:`pmodel.ops.weights`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import functools

from . import moe as _moe
from . import reference
from .fused_ce import linear_cross_entropy as _chunked_linear_ce
from .kernels import DEFAULT, KernelUnavailable, Kernels, backend_for_device, kernels_for
from .mc2 import all_gather_linear, linear_reduce_scatter
from .moe import Routed, moe_capacity, moe_capacity_keep, moe_route, router_stats
from .reference import IGNORE_INDEX, alibi_bias, alibi_slopes, attention_mask, rope_cos_sin, rope_inv_freq
from .weights import Weight, WeightWrapper, is_wrapper

__all__ = [
    "Kernels", "IGNORE_INDEX", "linear", "embedding", "rms_norm", "layer_norm", "rotary",
    "attention", "attention_mask", "swiglu", "geglu", "gelu", "cross_entropy",
    "linear_cross_entropy", "rope_inv_freq", "rope_cos_sin", "alibi_slopes", "alibi_bias",
    "backend_name", "Weight", "WeightWrapper", "is_wrapper",
    "implementation", "kernels_for", "KernelUnavailable", "all_gather_linear", "linear_reduce_scatter",
    "moe_route", "moe_capacity", "moe_capacity_keep", "moe_dispatch", "grouped_linear", "grouped_mlp",
    "moe_combine", "router_stats", "Routed",
]


def backend_name(x: torch.Tensor, kernels: Kernels | None) -> str:
    """The backend an op on ``x`` uses under ``kernels``."""
    k = kernels or DEFAULT
    if k.backend is not None:
        return k.backend
    return backend_for_device(x.device)


# op -> (the Kernels field that allows its fused kernel, the unfused implementation)
_POLICY = {
    "rms_norm": ("fused_norm", reference.rms_norm),
    "swiglu": ("fused_swiglu", reference.swiglu),
    "rotary": ("fused_rotary", reference.rotary),
    "attention": ("fused_attention", reference.attention_math),
    "moe_dispatch": ("fused_moe", _moe.moe_dispatch),
    "grouped_linear": ("fused_moe", _moe.grouped_linear),
    "moe_combine": ("fused_moe", _moe.moe_combine),
}


def _fused(backend: str, name: str):
    """The backend's fused kernel for op ``name``, or None."""
    if backend == "cuda":
        from . import cuda as mod
    elif backend == "npu":
        from . import npu as mod
    else:  # the reference backend's only fused op is SDPA
        return reference.attention if name == "attention" else None
    return getattr(mod, name, None)


def implementation(name: str, x: torch.Tensor, kernels: Kernels | None = None):
    """The function op ``name`` runs for ``x`` under ``kernels`` (chosen, not run).

    With the op's ``Kernels`` field on and a fused kernel on the backend, that kernel; otherwise
    the unfused implementation (:mod:`pmodel.ops.reference`; for attention
    :func:`~pmodel.ops.reference.attention_math`). Ops without a policy field (layer_norm,
    geglu, gelu) always use the reference.
    """
    if name not in _POLICY:
        return getattr(reference, name)
    field, unfused = _POLICY[name]
    k = kernels or DEFAULT
    fn = _fused(backend_name(x, k), name) if getattr(k, field) else None
    return fn or unfused


_impl = implementation


# ----------------------------------------------------------------------------- weight-typed ops
def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None, *, kernels: Kernels | None = None,
           in_shard: tuple[int, int] | None = None) -> torch.Tensor:
    """``x @ w.T + bias``; ``w`` may be a plain ``[out, in]`` tensor or a wrapper leaf.

    ``in_shard=(start, full_width)``: ``x`` holds input columns ``[start, start + x.shape[-1])``
    of a full input of width ``full_width`` (row parallel); a plain tensor ignores it, a wrapper
    receives it (see :mod:`pmodel.ops.weights`).
    """
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return w.linear(x, bias, kernels=kernels, in_shard=in_shard)


def embedding(tokens: torch.Tensor, w, *, kernels: Kernels | None = None) -> torch.Tensor:
    """Row lookup ``w[tokens]``; ``w`` may be a wrapper (vocab parallel)."""
    if isinstance(w, torch.Tensor):
        return F.embedding(tokens, w)
    if not hasattr(w, "embedding"):
        raise TypeError(f"ops.embedding: the weight wrapper {type(w).__name__} does not implement embedding")
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
    if fn is reference.attention or fn is reference.attention_math:
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


# ----------------------------------------------------------------------------- mixture of experts
def moe_dispatch(x, experts, num_experts: int, keep=None, *, kernels: Kernels | None = None):
    """Token rows sorted by expert: ``(xs (M, D), routed)`` (see :mod:`pmodel.ops.moe`);
    ``npu_moe_init_routing`` on NPU with ``Kernels.fused_moe``."""
    return _impl("moe_dispatch", x, kernels)(x, experts, num_experts, keep)


def moe_combine(ys, weights, routed: Routed, *, kernels: Kernels | None = None):
    """Weighted sum of each token's expert rows back in token order ``(N, D)``. Follows the
    lowering that dispatched (an NPU-routed record is finalised by ``npu_moe_finalize_routing``)."""
    if routed.src_to_dst is not None:
        from . import npu
        return npu.moe_combine(ys, weights, routed)
    return _moe.moe_combine(ys, weights, routed)


def grouped_linear(xs, w, counts, *, kernels: Kernels | None = None):
    """Per-expert ``xs_e @ w[e].T`` over rows grouped by expert; ``w`` ``(E, out, in)``.
    ``torch._grouped_mm`` on CUDA / ``npu_grouped_matmul`` on NPU with ``Kernels.fused_moe``.
    A wrapper weight (LoRA on stacked expert weights) implements ``grouped_linear(xs, counts, *,
    kernels)`` itself."""
    if not isinstance(w, torch.Tensor):
        if not hasattr(w, "grouped_linear"):
            raise TypeError(f"ops.grouped_linear: the weight wrapper {type(w).__name__} does not implement grouped_linear")
        return w.grouped_linear(xs, counts, kernels=kernels)
    return _impl("grouped_linear", xs, kernels)(xs, w, counts)


def grouped_mlp(xs, counts, gate, up, down, *, kernels: Kernels | None = None):
    """The experts' SwiGLU MLPs over rows grouped by expert (``counts[e]`` rows each).

    ``gate`` may be a wrapper weight implementing ``grouped_mlp(xs, counts, up, down, *,
    kernels)`` (expert parallel: it exchanges the rows with the ranks holding the experts);
    plain ``(E, F, D)`` / ``(E, F, D)`` / ``(E, D, F)`` tensors (or wrappers implementing
    ``grouped_linear``, e.g. LoRA) run locally.
    """
    if hasattr(gate, "grouped_mlp"):
        return gate.grouped_mlp(xs, counts, up, down, kernels=kernels)
    return _moe.grouped_swiglu_mlp(xs, counts, gate, up, down,
                                   linear=functools.partial(grouped_linear, kernels=kernels),
                                   swiglu=functools.partial(swiglu, kernels=kernels))
