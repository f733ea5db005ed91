"""CPU stand-ins for the torch_npu ops pmodel lowers to (tests only).

Registered under the real ``npu`` namespace and op names with the documented schemas and
semantics, so ``pmodel.ops.npu`` runs unchanged on CPU. They are installed only when the real
torch_npu is absent, and only by the tests that ask for them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCHEMAS = {
    "npu_rms_norm": "npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",
    "npu_swiglu": "npu_swiglu(Tensor self, int dim=-1) -> Tensor",
    "npu_rotary_mul": "npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half') -> Tensor",
    "npu_fusion_attention": (
        "npu_fusion_attention(Tensor query, Tensor key, Tensor value, int head_num, str input_layout, "
        "Tensor? pse=None, Tensor? padding_mask=None, Tensor? atten_mask=None, float scale=1., "
        "float keep_prob=1., int pre_tockens=2147483647, int next_tockens=2147483647, int inner_precise=0, "
        "int[]? prefix=None, int[]? actual_seq_qlen=None, int[]? actual_seq_kvlen=None, int sparse_mode=0, "
        "bool gen_mask_parallel=True, bool sync=False) -> (Tensor, Tensor, Tensor, Tensor, int, int, int)"),
}


def _rms_norm(x, gamma, epsilon=1e-6):
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd).to(x.dtype) * gamma, rstd


def _swiglu(x, dim=-1):
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b


def _rotary_mul(x, r1, r2, rotary_mode="half"):
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, -1)
        rot = torch.cat((-x2, x1), -1)
    elif rotary_mode == "interleave":
        rot = torch.stack((-x[..., 1::2], x[..., 0::2]), -1).flatten(-2)
    else:
        raise ValueError(rotary_mode)
    return x * r1 + rot * r2


def _fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                      atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                      next_tockens=2147483647, inner_precise=0, prefix=None, actual_seq_qlen=None,
                      actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True, sync=False):
    assert input_layout == "BSND", input_layout
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, N, S, D)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)).float() * scale
    if pse is not None:
        s = s + pse.float()
    T, S = q.shape[2], k.shape[2]
    if sparse_mode == 2:  # causal, lower-right aligned; atten_mask is the compressed 2048 triangle
        masked = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
    elif sparse_mode == 0:
        masked = atten_mask
    else:
        raise NotImplementedError(f"stand-in sparse_mode {sparse_mode}")
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    out = (s.softmax(-1).to(v.dtype) @ v).transpose(1, 2)
    z = torch.zeros(1, dtype=torch.float32)
    return out.contiguous(), z, z, z, 0, 0, 0


IMPLS = {"npu_rms_norm": _rms_norm, "npu_swiglu": _swiglu, "npu_rotary_mul": _rotary_mul,
         "npu_fusion_attention": _fusion_attention}


def install():
    """Register the stand-ins (idempotent); returns the Library handle (keep it alive)."""
    if hasattr(torch.ops, "npu") and hasattr(torch.ops.npu, "npu_rms_norm"):
        try:
            torch.ops.npu.npu_rms_norm.default
            return None
        except (AttributeError, RuntimeError):
            pass
    lib = torch.library.Library("npu", "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, IMPLS[name], "CompositeImplicitAutograd")
    return lib
