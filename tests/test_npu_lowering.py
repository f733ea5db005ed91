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


# ----------------------------------------------------------------------------- MC2 (2 gloo ranks)
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _mc2_worker(rank, world):
    import torch.distributed as dist

    from npu_standins import CALLS, hccl_group, install as install_standins

    install_standins()
    group = hccl_group(range(world))
    f64 = torch.float64
    g = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    checks = {}
    mc2, plain = ops.Kernels(backend="npu", mc2=True), ops.Kernels(backend="npu")

    def run(fn, x, w, gy, kernels):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        CALLS.clear()
        y = fn(x, w, group, kernels=kernels)
        y.backward(gy)
        return y.detach(), x.grad, w.grad, dict(CALLS)

    def compare(name, got, want, calls, expect_calls):
        for part, a, b in zip(("y", "dx", "dw"), got, want):
            checks[f"{name} {part}"] = None if _rel(a, b) < 1e-6 else f"relative error {_rel(a, b):.3g}"
        checks[f"{name} calls"] = None if calls == expect_calls else f"stand-in calls {calls}, expected {expect_calls}"

    # column: x (B, T/tp, D) -> (B, T, out/tp); D = 256 is the kernel's smallest k
    B, T, D, O = 2, 4, 256, 6
    X, W = torch.randn(B, T, D, generator=g, dtype=f64), torch.randn(O * world, D, generator=g, dtype=f64)
    G = torch.randn(B, T, O * world, generator=g, dtype=f64)
    seq, cols = slice(rank * T // world, (rank + 1) * T // world), slice(rank * O, (rank + 1) * O)
    want = ((X @ W.T)[..., cols], (G @ W)[:, seq], torch.einsum("btn,btd->nd", G, X)[cols])
    args = (X[:, seq], W[cols], G[..., cols])
    fused = run(ops.all_gather_linear, *args, mc2)
    ref = run(ops.all_gather_linear, *args, plain)
    compare("column mc2", fused[:3], want, fused[3], {"npu_all_gather_base_mm": 1})
    compare("column reference", ref[:3], want, ref[3], {})
    compare("column mc2 vs reference", fused[:3], ref[:3], {}, {})

    # row: x (B, T, in/tp) -> (B, T/tp, out); in/tp = out = 256 (k of the forward and backward kernels)
    I, O = 256 * world, 256
    X, W = torch.randn(B, T, I, generator=g, dtype=f64), torch.randn(O, I, generator=g, dtype=f64)
    G = torch.randn(B, T, O, generator=g, dtype=f64)
    ins = slice(rank * 256, (rank + 1) * 256)
    want = ((X @ W.T)[:, seq], (G @ W)[..., ins], torch.einsum("bto,bti->oi", G, X)[:, ins])
    args = (X[..., ins], W[:, ins], G[:, seq])
    fused = run(ops.linear_reduce_scatter, *args, mc2)
    ref = run(ops.linear_reduce_scatter, *args, plain)
    compare("row mc2", fused[:3], want, fused[3], {"npu_mm_reduce_scatter_base": 1, "npu_all_gather_base_mm": 1})
    compare("row reference", ref[:3], want, ref[3], {})
    compare("row mc2 vs reference", fused[:3], ref[:3], {}, {})

    # mc2 on a group without an HCCL communicator is refused, not silently lowered differently
    try:
        ops.all_gather_linear(X[:, seq, :256], W[:6, :256], dist.group.WORLD, kernels=mc2)
        checks["gloo group refused"] = "no error"
    except ValueError as e:
        checks["gloo group refused"] = None if "HCCL" in str(e) else str(e)
    return checks


@pytest.mark.multiproc
def test_mc2_sequence_parallel_linears_on_two_ranks():
    from _dist import assert_all_ok, launch

    assert_all_ok(launch(_mc2_worker, 2, timeout_s=180))
