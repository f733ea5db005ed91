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


def _mc2_model_worker(rank, world):
    """``--use-mc2`` end to end: a TP2 + sequence-parallel model whose TP group has an HCCL
    communicator (the stand-in backend); Kernels(mc2=True) routes the column / row parallel linears
    through the fused MC2 ops; loss and every gradient equal mc2 off and the single process."""
    from npu_standins import CALLS, hccl_group, install as install_standins
    from pmodel.model import ModelConfig, build
    from pmodel.parallel import Mesh, shard_params, sync_replicated_grads, tensor_parallel
    from pmodel.parallel.mesh import DIMS

    install_standins()
    group = hccl_group(range(world))
    # the kernels' smallest inner dimension is 256: hidden 512, MLP 1024, 8 heads of 64 over tp 2
    cfg = ModelConfig(vocab_size=128, hidden_size=512, num_layers=1, num_heads=8, num_kv_heads=4,
                      ffn_hidden_size=1024, dtype=torch.float64)
    sizes = {d: (world if d == "tp" else 1) for d in DIMS}
    mesh = Mesh(sizes=sizes, global_rank=rank, world_size=world, coords={d: (rank if d == "tp" else 0) for d in DIMS},
                groups={d: (group if d == "tp" else None) for d in DIMS},
                group_ranks={d: (tuple(range(world)) if d == "tp" else (rank,)) for d in DIMS}, backend="gloo")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (2, 8), generator=g)
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1)}
    plain = build(cfg, ops.Kernels(backend="npu"))  # the same stand-in kernels on one process
    full = pmodel.init(plain, seed=1)
    loss_ref = plain.loss(full, batch)[0]
    loss_ref.backward()
    loss_ref = loss_ref.detach()
    checks, got = {}, {}
    for mc2 in (False, True):
        m = tensor_parallel(build(cfg, ops.Kernels(backend="npu", mc2=mc2)), mesh, sequence_parallel=True)
        params = shard_params(m, pmodel.init(plain, seed=1))
        CALLS.clear()
        loss = m.loss(params, batch)[0]
        loss.backward()
        sync_replicated_grads(m, params)  # sequence-parallel norm weights hold partial gradients
        got[mc2] = (loss.detach(), [x.grad for x in tree.leaves(params)], dict(CALLS))
    want_grads = tree.leaves(shard_params(m, tree.map(lambda x: x.grad, full)))
    # The stand-ins take rms_norm's statistics in fp32 (as the kernel does), so TP's other
    # summation order shows at ~1e-8 against one process; mc2 on vs off is the same arithmetic.
    for mc2, (loss, grads, calls) in got.items():
        tag = f"mc2={mc2}"
        checks[f"{tag} loss == one process"] = None if _rel(loss, loss_ref) < 1e-6 else f"{loss} vs {loss_ref}"
        worst = max(_rel(a, b) for a, b in zip(grads, want_grads))
        checks[f"{tag} grads == one process"] = None if worst < 1e-6 else f"worst {worst:.3g}"
        if mc2:
            worst = max(_rel(a, b) for a, b in zip(grads, got[False][1]))
            checks["mc2 on == off (loss, grads)"] = None if worst < 1e-12 and _rel(loss, got[False][0]) < 1e-12 \
                else f"worst {worst:.3g}"
        # per layer: q, k, v, gate, up (column) and o, down (row); the row ops' backward gathers too
        n_ag, n_rs = calls.get("npu_all_gather_base_mm", 0), calls.get("npu_mm_reduce_scatter_base", 0)
        want = (5 + 2, 2) if mc2 else (0, 0)
        checks[f"{tag} MC2 kernel calls"] = None if (n_ag, n_rs) == want else f"all-gather-mm {n_ag}, mm-rs {n_rs}"
    return checks


@pytest.mark.multiproc
def test_use_mc2_routes_sequence_parallel_linears_through_mc2():
    from _dist import assert_all_ok, launch

    assert_all_ok(launch(_mc2_model_worker, 2, timeout_s=180))
