"""MoE ops and the MoE decoder layer: dropless / capacity routing (hand computations), the
lowerings (CUDA grouped GEMM choice and numerics on CPU, NPU through schema-faithful stand-ins)
against the reference, every config option taking effect or refused."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import pmodel
from pmodel import ops, tree
from pmodel.model import ModelConfig, build
from pmodel.ops import moe as M

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                  num_experts=4, moe_top_k=2, moe_aux_loss_coeff=0.02, moe_z_loss_coeff=1e-3)


def _batch(seed=0, B=2, T=12):
    t = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))
    return {"tokens": t, "labels": torch.roll(t, -1, 1)}


def _loss_grads(model, params, batch):
    loss, aux = model.loss(params, batch)
    return loss, aux, torch.autograd.grad(loss, tree.leaves(params))


def test_route_is_softmax_topk_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, w, e = ops.moe_route(logits, 2)
    p = torch.softmax(logits, -1)[0]
    assert e.tolist() == [[0, 1]]
    torch.testing.assert_close(w[0], torch.stack([p[0], p[1]]) / (p[0] + p[1]))


def test_capacity_hand_computation():
    experts = torch.tensor([[0], [0], [0], [1], [0], [1]])
    weights = torch.tensor([[.9], [.6], [.8], [.7], [.95], [.5]])
    cap = ops.moe_capacity(6, 2, 1, 0.5)
    assert cap == math.ceil(6 * 1 / 2 * 0.5) == 2
    keep = ops.moe_capacity_keep(experts, weights, 2, cap, "probs")      # expert 0 keeps tokens 4 (.95), 0 (.9)
    assert keep[:, 0].tolist() == [True, False, False, True, True, True]
    keep = ops.moe_capacity_keep(experts, weights, 2, cap, "position")   # expert 0 keeps tokens 0, 1
    assert keep[:, 0].tolist() == [True, True, False, True, False, True]
    x = torch.randn(6, 4)
    xs, routed = ops.moe_dispatch(x, experts, 2, keep)
    assert int(routed.dropped) == 2 and routed.counts.tolist() == [2, 2]
    out = ops.moe_combine(xs * 2, weights, routed)
    want = 2 * x * weights * keep.float()
    torch.testing.assert_close(out, want)


def test_dispatch_combine_is_a_weighted_permutation_and_dropless_drops_nothing():
    g = torch.Generator().manual_seed(0)
    N, E, k, D = 37, 5, 3, 8
    x = torch.randn(N, D, generator=g)
    probs, w, e = ops.moe_route(torch.randn(N, E, generator=g), k)
    xs, routed = ops.moe_dispatch(x, e, E)
    assert int(routed.dropped) == 0 and int(routed.counts.sum()) == N * k
    assert routed.counts.tolist() == torch.bincount(e.reshape(-1), minlength=E).tolist()
    # rows are grouped by expert, and each row is its token
    exp_of_row = e.reshape(-1)[routed.order]
    assert bool((exp_of_row[1:] >= exp_of_row[:-1]).all())
    torch.testing.assert_close(xs, x[routed.order // k])
    torch.testing.assert_close(ops.moe_combine(xs, w, routed), x * w.sum(1, keepdim=True))


def _python_loop_moe(cfg, p, x):
    """An independent per-token Python implementation of one MoE layer (the oracle for counts
    and outputs under a capacity): returns (out, dropped)."""
    E, k = cfg.num_experts, cfg.moe_top_k
    N = x.shape[0]
    logits = x.float() @ p["router"]["weight"].float().T
    probs = torch.softmax(logits, -1)
    cap = math.ceil(N * k / E * cfg.moe_capacity_factor) if cfg.moe_capacity_factor else None
    pairs = []
    for t in range(N):
        w, e = torch.topk(probs[t], k)
        w = w / w.sum()
        pairs += [(t, int(e[j]), float(w[j])) for j in range(k)]
    kept = set()
    for ex in range(E):
        mine = [(t, w) for t, e, w in pairs if e == ex]
        if cap is not None:
            mine = sorted(mine, key=lambda tw: (-tw[1], tw[0]))[:cap]
        kept |= {(t, ex) for t, _ in mine}
    out = torch.zeros_like(x)
    ex = p["experts"]
    for t, e, w in pairs:
        if (t, e) in kept:
            h = torch.nn.functional.silu(x[t] @ ex["gate_proj"][e].T) * (x[t] @ ex["up_proj"][e].T)
            out[t] += w * (h @ ex["down_proj"][e].T)
    return out, len(pairs) - len(kept)


@pytest.mark.parametrize("factor", [None, 0.5, 1.0])
def test_layer_matches_a_per_token_python_loop_and_counts_drops(factor):
    from pmodel.model import Context, _moe
    cfg = CFG.replace(moe_capacity_factor=factor)
    params = pmodel.init(build(cfg), seed=0)
    p = params["layers"][0]["mlp"]
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, stats = _moe(cfg, p, x, Context(positions=torch.zeros(2, 9, dtype=torch.long)), ops.Kernels())
        want, dropped = _python_loop_moe(cfg, p, x.reshape(-1, 32))
    torch.testing.assert_close(out.reshape(-1, 32), want, rtol=1e-5, atol=1e-6)
    assert int(stats["dropped"]) == dropped
    if factor is None:
        assert dropped == 0
    if factor == 0.5:
        assert dropped > 0  # the capacity really bites


def test_loss_reports_aux_losses_separately_and_coefficients_take_effect():
    b = _batch()
    m = build(CFG)
    params = pmodel.init(m, seed=0)
    loss, aux = m.loss(params, b)
    ce = aux["loss_sum"] / aux["num_tokens"]
    torch.testing.assert_close(loss, ce + 0.02 * aux["moe_aux_loss"] + 1e-3 * aux["moe_z_loss"])
    assert int(aux["moe_dropped"]) == 0 and int(aux["moe_pairs"]) == CFG.num_layers * 24 * CFG.moe_top_k
    assert int(aux["moe_expert_counts"].sum()) == CFG.num_layers * 24 * CFG.moe_top_k
    off = build(CFG.replace(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0))
    l0, a0 = off.loss(params, b)
    torch.testing.assert_close(l0, ce)
    torch.testing.assert_close(a0["moe_aux_loss"], aux["moe_aux_loss"])  # still reported
    # per-layer (Megatron) form differs from the pooled (transformers) one
    pl = build(CFG.replace(moe_aux_loss_type="per_layer"))
    assert not torch.allclose(pl.loss(params, b)[1]["moe_aux_loss"], aux["moe_aux_loss"])
    # micro-batches: the aux term is weighted by each micro-batch's share of the tokens
    b2 = _batch(1)
    n = 48
    parts = [m.loss(params, x, num_tokens=n) for x in (b, b2)]
    want = sum((x[1]["loss_sum"] / n + (24 / n) * (0.02 * x[1]["moe_aux_loss"] + 1e-3 * x[1]["moe_z_loss"]))
               for x in parts)
    torch.testing.assert_close(sum(x[0] for x in parts), want)


def test_shared_expert_and_capacity_change_the_output_and_refusals():
    b = _batch()
    base = pmodel.init(build(CFG), seed=0)
    shared = build(CFG.replace(moe_shared_expert_ffn=16))
    ps = pmodel.init(shared, seed=0)
    assert "shared" in ps["layers"][0]["mlp"]
    assert not torch.allclose(shared.apply(ps, b["tokens"]), build(CFG).apply(base, b["tokens"]))
    capped = build(CFG.replace(moe_capacity_factor=0.5))
    assert not torch.allclose(capped.apply(base, b["tokens"]), build(CFG).apply(base, b["tokens"]))
    for kw, msg in (({"moe_router_jitter": 0.01}, "jitter"), ({"moe_top_k": 5}, "moe_top_k"),
                    ({"activation": "gelu"}, "SwiGLU"), ({"mlp_bias": True}, "biases"),
                    ({"moe_capacity_factor": 0.0}, "capacity"), ({"moe_drop_policy": "random"}, "drop_policy"),
                    ({"moe_aux_loss_type": "x"}, "aux_loss_type")):
        with pytest.raises(ValueError, match=msg):
            CFG.replace(**kw)


def test_recompute_and_tensor_parallel_pass_the_carry():
    from pmodel.remat import recompute
    b = _batch()
    m = build(CFG)
    p = pmodel.init(m, seed=0)
    l0, a0, g0 = _loss_grads(m, p, b)
    l1, a1, g1 = _loss_grads(recompute(m, "full"), p, b)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for x, y in zip(g1, g0):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_generation_runs_through_the_generic_step():
    m = build(CFG)
    p = pmodel.init(m, seed=0)
    t = _batch()["tokens"][:1, :5]
    out = pmodel.generate(m, p, t, max_new_tokens=3, temperature=0.0)
    full = t
    for _ in range(3):  # greedy by full forwards
        nxt = m.apply(p, full)[:, -1].argmax(-1, keepdim=True)
        full = torch.cat([full, nxt], 1)
    assert torch.equal(torch.as_tensor(out).reshape(-1)[-3:], full[0, -3:])


# ----------------------------------------------------------------------------- CUDA lowering (choice + numerics on CPU)
def test_cuda_choice_without_a_gpu():
    from pmodel.ops import cuda as C
    from pmodel.ops.kernels import AVAILABLE, HAS_GROUPED_MM
    x = torch.randn(2, 3)
    cu = ops.Kernels(backend="cuda")
    want = C.grouped_linear if HAS_GROUPED_MM else M.grouped_linear
    assert ops.implementation("grouped_linear", x, cu) is want
    assert ops.implementation("grouped_linear", x, cu.replace(fused_moe=False)) is M.grouped_linear
    assert ops.implementation("moe_dispatch", x, cu) is M.moe_dispatch  # sort + gather: reference
    assert ops.implementation("grouped_linear", x) is M.grouped_linear  # reference backend
    assert ("fused_moe" in AVAILABLE["cuda"]) == HAS_GROUPED_MM and "fused_moe" not in AVAILABLE["reference"]
    assert ops.kernels_for(backend="cpu").fused_moe is False
    with pytest.raises(ops.KernelUnavailable, match="grouped_gemm"):
        ops.kernels_for(backend="cpu", grouped_gemm=True)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch build has no torch._grouped_mm")
def test_cuda_grouped_mm_lowering_equals_reference_on_cpu():
    """torch._grouped_mm runs on CPU too (fp32, 16-byte aligned widths): the CUDA lowering's
    forward and backward (its own grouped GEMMs for dx and dw) equal the reference."""
    m = build(CFG)
    p = pmodel.init(m, seed=0)
    b = _batch()
    l0, _, g0 = _loss_grads(m, p, b)
    l1, _, g1 = _loss_grads(m.replace(kernels=ops.Kernels(backend="cuda", fused_norm=False)), p, b)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for x, y in zip(g1, g0):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- NPU lowering (stand-ins)
NPU_MOE_OPS = ("npu_moe_init_routing", "npu_moe_compute_expert_tokens", "npu_grouped_matmul",
               "npu_moe_finalize_routing")


@pytest.fixture
def standins():
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("real torch_npu installed: stand-ins would shadow it")
    from npu_standins import CALLS, install
    lib = install()
    yield CALLS
    del lib


@pytest.mark.parametrize("factor", [None, 0.5])
def test_npu_lowering_equals_reference(standins, factor):
    CALLS = standins
    cfg = CFG.replace(moe_capacity_factor=factor)
    m = build(cfg)
    p = pmodel.init(m, seed=0)
    b = _batch()
    l0, a0, g0 = _loss_grads(m, p, b)
    npu = ops.Kernels(backend="npu", fused_norm=False, fused_swiglu=False, fused_rotary=False, fused_attention=False)
    CALLS.clear()
    l1, a1, g1 = _loss_grads(m.replace(kernels=npu), p, b)
    assert all(CALLS[o] > 0 for o in NPU_MOE_OPS), dict(CALLS)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert int(a1["moe_dropped"]) == int(a0["moe_dropped"])
    for x, y in zip(g1, g0):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    CALLS.clear()
    m.replace(kernels=npu.replace(fused_moe=False)).loss(p, b)
    assert sum(CALLS.values()) == 0, dict(CALLS)


def test_train_step_reports_router_losses_separately():
    """plan.step's metrics carry the load-balancing and z losses (token-weighted over the
    micro-batches) and the dropped / routed pairs, apart from the cross-entropy loss."""
    import pmodel
    from pmodel import optim
    from pmodel.model import ModelConfig, build
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48, num_experts=4,
                      moe_top_k=2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001, moe_capacity_factor=0.5)
    model = build(cfg)
    params = pmodel.init(model, seed=0)
    g = torch.Generator().manual_seed(0)
    mbs = [{"tokens": (t := torch.randint(0, 64, (2, 8), generator=g)), "labels": torch.roll(t, -1, 1)}
           for _ in range(2)]
    n = sum(int(mb["labels"].numel()) for mb in mbs)
    want = [model.loss(params, mb, num_tokens=n)[1] for mb in mbs]
    step = pmodel.train.train_step(model, optim.sgd(0.0))
    _, _, m = step(params, step.init(params), mbs)
    lb = sum(float(a["moe_aux_loss"]) * float(a["moe_weight"]) for a in want)
    z = sum(float(a["moe_z_loss"]) * float(a["moe_weight"]) for a in want)
    assert m["moe_aux_loss"] == pytest.approx(lb, rel=1e-6) and m["moe_z_loss"] == pytest.approx(z, rel=1e-6)
    assert m["moe_dropped"] == sum(int(a["moe_dropped"].sum()) for a in want) > 0
    assert m["moe_routed_pairs"] == sum(int(a["moe_pairs"].sum()) for a in want) == 2 * n * cfg.num_layers
    assert m["loss"] == pytest.approx(sum(float(a["loss_sum"]) for a in want) / n, rel=1e-6)  # cross-entropy only
