"""Expert parallelism (gloo) equals one process: EP2 (2 ranks); EP2 x TP2 and EP2 x DP2 with ZeRO-1
(4 ranks, one launch). Forward loss, every gradient and 5 training steps (SGD with momentum,
global-norm clipping active, aux and z losses on) within 1e-5 relative of a single process
running all ranks' micro-batches; MoE + pipeline / sequence parallel are refused with the reason."""
from __future__ import annotations

import pytest
import torch

from _dist import assert_all_ok, launch

import pmodel
from pmodel import optim, tree
from pmodel.model import ModelConfig, build
from pmodel.params import is_decl

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=24,
                  num_experts=4, moe_top_k=2, moe_aux_loss_coeff=0.02, moe_z_loss_coeff=1e-3)


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, 64, (2, 12), generator=g)
        out.append({"tokens": t, "labels": torch.roll(t, -1, 1)})
    return out


def _close(a, b, tol=1e-5):
    a, b = a.detach().double(), b.detach().double()
    bad = (a - b).abs() > tol * (b.abs() + b.abs().max())
    return None if not bool(bad.any()) else f"max diff {float((a - b).abs().max()):.3g} (max |b| {float(b.abs().max()):.3g})"


def _local_pieces(params) -> dict:
    return {p.removesuffix(".shard"): t for p, t in tree.paths(params)}


def _check_layout(rank, world, sizes, *, zero=False):
    from pmodel.parallel import Mesh, parallelize
    from pmodel.parallel.layout import layout_of
    mesh = Mesh.build(**sizes)
    data_ranks = mesh.size("ep") * mesh.size("dp")
    data_rank = mesh.rank("ep") + mesh.size("ep") * mesh.rank("dp")
    steps, per_rank = [_batches(2 * data_ranks, seed=s) for s in range(5)], 2
    model = build(CFG)
    tag = "x".join(f"{k}{v}" for k, v in sizes.items())
    res = {}
    # --- forward / backward equality at the initial params
    plan = parallelize(model, optim.sgd(0.1, momentum=0.9), mesh, distributed_optimizer=zero, max_grad_norm=0.5)
    params = plan.init(seed=0)
    ref_model = build(CFG)
    ref = pmodel.init(ref_model, seed=0)
    mbs = steps[0]
    n = sum(int(mb["labels"].numel()) for mb in mbs)
    ref_loss = sum(ref_model.loss(ref, mb, num_tokens=n)[0] for mb in mbs)
    ref_loss.backward()
    mine = mbs[data_rank * per_rank:(data_rank + 1) * per_rank]
    loss = sum(plan.model.loss(params, mb, num_tokens=n)[0] for mb in mine)
    loss.backward()
    layout = layout_of(plan.model)
    layout.sync_grads(plan.model.defs, params)  # the EP data reduction of the dense grads
    # the dp part of the data reduction (the plan's DataParallel does this in a step)
    import torch.distributed as dist
    local = _local_pieces(params)
    full = dict(tree.paths(ref))
    for path, decl in tree.paths(plan.model.defs, is_leaf=is_decl):
        g = local[path].grad.clone()
        if mesh.size("dp") > 1:
            dist.all_reduce(g, group=mesh.group("dp"))
        want = full[path].grad[layout.leaf_slice(path, decl)]
        res[f"{tag} grad {path}"] = _close(g, want)
    tot = loss.detach().clone()
    for d in ("ep", "dp"):
        if mesh.size(d) > 1:
            dist.all_reduce(tot, group=mesh.group(d))
    res[f"{tag} loss"] = _close(tot, ref_loss.detach())
    # --- 5 training steps through the one train step
    plan = parallelize(model, optim.sgd(0.1, momentum=0.9), mesh, distributed_optimizer=zero, max_grad_norm=0.5)
    params = plan.init(seed=0)
    state = plan.tx.init(params)
    one = pmodel.parallel.plan.single(build(CFG), optim.sgd(0.1, momentum=0.9), max_grad_norm=0.5)
    rp = one.init(seed=0)
    rs = one.tx.init(rp)
    for s, mbs in enumerate(steps):
        params, state, m = plan.step(params, state, mbs[data_rank * per_rank:(data_rank + 1) * per_rank])
        rp, rs, rm = one.step(rp, rs, mbs)
        res[f"{tag} step {s} loss"] = _close(torch.tensor(m["loss"]), torch.tensor(rm["loss"]))
        res[f"{tag} step {s} grad_norm"] = _close(torch.tensor(m["grad_norm"]), torch.tensor(rm["grad_norm"]))
    local, full = _local_pieces(params), dict(tree.paths(rp))
    layout = layout_of(plan.model)
    moved = 0
    for path, decl in tree.paths(plan.model.defs, is_leaf=is_decl):
        want = full[path].detach()[layout.leaf_slice(path, decl)]
        res[f"{tag} params after 5 steps {path}"] = _close(local[path], want)
        moved += 1
    res[f"{tag} every leaf compared"] = None if moved == len(full) else f"{moved} of {len(full)}"
    # experts really are split: this rank holds E/ep of them
    g = local["layers.0.mlp.experts.gate_proj"]
    res[f"{tag} local experts"] = None if g.shape[0] == CFG.num_experts // mesh.size("ep") else str(g.shape)
    return res


def _worker(rank, world):
    if world == 2:
        return _check_layout(rank, world, {"ep": 2})
    out = _check_layout(rank, world, {"ep": 2, "tp": 2})
    out.update(_check_layout(rank, world, {"ep": 2, "dp": 2}, zero=True))
    return out


@pytest.mark.multiproc
def test_ep2_equals_one_process():
    assert_all_ok(launch(_worker, 2))


@pytest.mark.multiproc
def test_ep2_tp2_and_ep2_dp2_zero_equal_one_process():
    assert_all_ok(launch(_worker, 4))


def test_refusals_name_the_reason():
    from pmodel.parallel.plan import layout_problems
    p = layout_problems(CFG, {"ep": 2, "pp": 2})
    assert any("pipeline" in x for x in p)
    assert any("sequence_parallel" in x for x in layout_problems(CFG, {"ep": 2, "tp": 2}, sequence_parallel=True))
    assert any("not divisible" in x for x in layout_problems(CFG, {"ep": 3}))
    dense = CFG.replace(num_experts=0)
    assert any("mixture-of-experts" in x for x in layout_problems(dense, {"ep": 2}))
