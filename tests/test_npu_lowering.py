"""The NPU lowering (pmodel.ops.npu) on CPU through stand-in ops with torch_npu's names and schemas.

Proves the lowering's argument conventions (mask polarity, explicit scale, full-width rotary
tables, swiglu halves, GQA, sparse_mode) against the reference ops, and that a whole model
forced onto the NPU backend gives the reference logits and gradients.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import pmodel
from pmodel import ops, tree

if importlib.util.find_spec("torch_npu") is not None:
    pytest.skip("real torch_npu installed: stand-ins would shadow it", allow_module_level=True)

from npu_standins import install  # noqa: E402

_LIB = install()
NPU = ops.Kernels(backend="npu")


def test_rms_norm_swiglu_rotary():
    x, w = torch.randn(2, 5, 16), torch.randn(16)
    for off in (0.0, 1.0):
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6, off, kernels=NPU), ops.rms_norm(x, w, 1e-6, off))
    g, u = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ops.swiglu(g, u, kernels=NPU), ops.swiglu(g, u))
    q = torch.randn(2, 6, 3, 16)
    pos = torch.arange(6).expand(2, 6)
    for frac in (1.0, 0.5):
        cos, sin = ops.rope_cos_sin(pos, ops.rope_inv_freq(int(16 * frac), 10000.0), torch.float32)
        for inter in (False, True):
            torch.testing.assert_close(ops.rotary(q, cos, sin, interleaved=inter, kernels=NPU),
                                       ops.rotary(q, cos, sin, interleaved=inter))


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_attention_causal_and_masked(hkv):
    B, T, H, D = 2, 7, 4, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, hkv, D), torch.randn(B, T, hkv, D)
    torch.testing.assert_close(ops.attention(q, k, v, causal=True, kernels=NPU), ops.attention(q, k, v, causal=True))
    idx = torch.arange(T).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    m = ops.attention_mask(q_idx=idx, k_idx=idx, window=4, key_valid=valid)
    torch.testing.assert_close(ops.attention(q, k, v, mask=m, kernels=NPU), ops.attention(q, k, v, mask=m))


def test_whole_model_on_npu_backend_equals_reference():
    m = pmodel.families.preset("debug")
    p = pmodel.init(m, seed=0)
    mn = m.replace(kernels=NPU)  # the policy travels in the forward context: no rebuild needed
    t = torch.randint(0, 512, (2, 9))
    torch.testing.assert_close(mn.apply(p, t), m.apply(p, t), rtol=1e-5, atol=1e-5)
    lab = torch.roll(t, -1, 1)
    l1, _ = m.loss(p, {"tokens": t, "labels": lab})
    g1 = torch.autograd.grad(l1, tree.leaves(p))
    l2, _ = mn.loss(p, {"tokens": t, "labels": lab})
    g2 = torch.autograd.grad(l2, tree.leaves(p))
    torch.testing.assert_close(l2, l1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
