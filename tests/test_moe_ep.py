"""Expert parallelism (gloo) equals one process: EP2 (2 ranks); EP2 x TP2 and EP2 x DP2 with ZeRO-1
(4 ranks, one launch). Forward loss, every gradient and 5 training steps (SGD with momentum,
global-norm clipping active, aux and z losses on) within 1e-5 relative of a single process
running all ranks' micro-batches. MoE under pipeline parallel (router statistics passed between stages
with the activations): PP2 (1F1B; zero-bubble on an uneven split with padding and the per-layer
aux loss; interleaved) and EP2 x PP2, the same checks."""
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


def _check_memory(plan, params, state, cfg, mesh, layout, tag):
    """``memory.estimate`` (experts / ep) within 5% of the bytes this rank's params, gradient
    buffers and optimizer state hold (fp32, SGD with momentum: one moment)."""
    from pmodel.parallel.memory import estimate, measured_bytes
    mem = measured_bytes(params, state, plan.data_parallel(params).buffers)
    est = estimate(cfg, tp=mesh.size("tp"), pp=mesh.size("pp"), dp=mesh.size("dp"), ep=mesh.size("ep"),
                   layout=layout, param_bytes=4, grad_bytes=4, moments=1)
    bad = [f"{k}: estimate {getattr(est, k):.0f} B vs measured {mem[k]} B" for k in ("params", "grads", "optimizer")
           if abs(getattr(est, k) - mem[k]) > 0.05 * mem[k]]
    if mesh.size("pp") == 1 and mem["params"] != est.params:  # one stage: exact
        bad.append(f"params: estimate {est.params} B vs measured {mem['params']} B")
    return {f"{tag} memory estimate vs measured ({layout})": "; ".join(bad) or None}


def _check_layout(rank, world, sizes, *, zero=False, sp=False, pad=False):
    from pmodel.parallel import Mesh, parallelize
    from pmodel.parallel.layout import layout_of
    mesh = Mesh.build(**sizes)
    data_ranks = mesh.size("ep") * mesh.size("dp")
    data_rank = mesh.rank("ep") + mesh.size("ep") * mesh.rank("dp")
    mk = _padded if pad else (lambda x: x)
    steps, per_rank = [mk(_batches(2 * data_ranks, seed=s)) for s in range(5)], 2
    model = build(CFG)
    tag = "x".join(f"{k}{v}" for k, v in sizes.items()) + (" sp" if sp else "") + (" padded" if pad else "")
    res = {}
    # --- forward / backward equality at the initial params
    plan = parallelize(model, optim.sgd(0.1, momentum=0.9), mesh, distributed_optimizer=zero, max_grad_norm=0.5,
                       sequence_parallel=sp)
    params = plan.init(seed=0)
    ref_model = build(CFG)
    ref = pmodel.init(ref_model, seed=0)
    mbs = steps[0]
    n = sum(int((mb["labels"] != -100).sum()) for mb in mbs)
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
    plan = parallelize(model, optim.sgd(0.1, momentum=0.9), mesh, distributed_optimizer=zero, max_grad_norm=0.5,
                       sequence_parallel=sp)
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
        res[f"{tag} step {s} moe metrics"] = (
            _close(torch.tensor([m["moe_aux_loss"], m["moe_z_loss"]]), torch.tensor([rm["moe_aux_loss"], rm["moe_z_loss"]]))
            or (None if (m["moe_dropped"], m["moe_routed_pairs"]) == (rm["moe_dropped"], rm["moe_routed_pairs"])
                else f"dropped/pairs {m['moe_dropped']}/{m['moe_routed_pairs']} vs {rm['moe_dropped']}/{rm['moe_routed_pairs']}"))
    local, full = _local_pieces(params), dict(tree.paths(rp))
    layout = layout_of(plan.model)
    moved = 0
    for path, decl in tree.paths(plan.model.defs, is_leaf=is_decl):
        want = full[path].detach()[layout.leaf_slice(path, decl)]
        res[f"{tag} params after 5 steps {path}"] = _close(local[path], want)
        moved += 1
    res[f"{tag} every leaf compared"] = None if moved == len(full) else f"{moved} of {len(full)}"
    res.update(_check_memory(plan, params, state, CFG, mesh, "distributed" if zero else "plain", tag))
    # experts really are split: this rank holds E/ep of them
    g = local["layers.0.mlp.experts.gate_proj"]
    res[f"{tag} local experts"] = None if g.shape[0] == CFG.num_experts // mesh.size("ep") else str(g.shape)
    return res


def _padded(mbs):
    """Left padding in row 1 of every micro-batch: router statistics count only real tokens."""
    out = []
    for mb in mbs:
        am = torch.ones_like(mb["tokens"])
        am[1, :3] = 0
        out.append(dict(mb, attention_mask=am, labels=mb["labels"].masked_fill(am == 0, -100)))
    return out


def _check_pipeline(rank, world, sizes, *, schedule="1f1b", layers=None, V=1, cfg=None, pad=False, steps=5):
    """MoE under pipeline parallel (the router statistics travel with the activations between
    stages, their gradients back): loss and every gradient at the initial params, then ``steps``
    plan steps, against one process running all micro-batches."""
    import torch.distributed as dist
    from pmodel.parallel import Mesh, parallelize
    from pmodel.parallel.layout import layout_of
    from pmodel.parallel.plan import PipelineSpec
    cfg = cfg or CFG.replace(num_layers=4)
    mesh = Mesh.build(**sizes)
    ep = mesh.size("ep")
    data_rank, per_rank = mesh.rank("ep"), 4
    mk = _padded if pad else (lambda x: x)
    batches = [mk(_batches(per_rank * ep, seed=s)) for s in range(max(steps, 1))]
    spec = PipelineSpec(schedule=schedule, layers_per_stage=layers, virtual_stages=V)
    tag = "x".join(f"{k}{v}" for k, v in sizes.items()) + f" {schedule}" + (f" {list(layers)}" if layers else "") + \
        (" padded" if pad else "") + f" {cfg.moe_aux_loss_type}"
    res = {}
    model = build(cfg)
    tx = optim.sgd(0.1, momentum=0.9)
    plan = parallelize(model, tx, mesh, pipeline=spec, max_grad_norm=0.5)
    params = plan.init(seed=0)
    ref = pmodel.init(model, seed=0)
    mbs = batches[0]
    n = sum(int(((mb["labels"] != -100)).sum()) for mb in mbs)
    ref_loss = sum(model.loss(ref, mb, num_tokens=n)[0] for mb in mbs)
    ref_loss.backward()
    mine = mbs[data_rank * per_rank:(data_rank + 1) * per_rank]
    loss, _ = plan.pipe.forward_backward(params, mine, num_tokens=torch.tensor(n))
    layout = layout_of(plan.stage_model)
    if layout is not None:
        layout.sync_grads(plan.stage_model.defs, params)
    local, full = _local_pieces(params), dict(tree.paths(ref))
    compared = 0
    for path, decl in tree.paths(plan.stage_model.defs, is_leaf=is_decl):
        want = full[path].grad
        if layout is not None:
            want = want[layout.leaf_slice(path, decl)]
        err = _close(local[path].grad, want)
        if err:
            res[f"{tag} grad {path}"] = err
        compared += 1
    res[f"{tag} grads"] = None if compared else "no leaves compared"
    tot = loss.detach().clone()
    if ep > 1:
        dist.all_reduce(tot, group=mesh.group("ep"))
    res[f"{tag} loss (with aux)"] = _close(tot, ref_loss.detach())
    if not steps:
        return res
    plan = parallelize(model, tx, mesh, pipeline=spec, max_grad_norm=0.5)
    params = plan.init(seed=0)
    state = plan.tx.init(params)
    one = pmodel.parallel.plan.single(build(cfg), tx, max_grad_norm=0.5)
    rp = one.init(seed=0)
    rs = one.tx.init(rp)
    for s, mbs in enumerate(batches):
        params, state, m = plan.step(params, state, mbs[data_rank * per_rank:(data_rank + 1) * per_rank])
        rp, rs, rm = one.step(rp, rs, mbs)
        res[f"{tag} step {s} loss"] = _close(torch.tensor(m["loss"]), torch.tensor(rm["loss"]))
        res[f"{tag} step {s} grad_norm"] = _close(torch.tensor(m["grad_norm"]), torch.tensor(rm["grad_norm"]))
        res[f"{tag} step {s} moe metrics"] = (
            _close(torch.tensor([m["moe_aux_loss"], m["moe_z_loss"]]), torch.tensor([rm["moe_aux_loss"], rm["moe_z_loss"]]))
            or (None if (m["moe_dropped"], m["moe_routed_pairs"]) == (rm["moe_dropped"], rm["moe_routed_pairs"])
                else f"dropped/pairs {m['moe_dropped']}/{m['moe_routed_pairs']} vs {rm['moe_dropped']}/{rm['moe_routed_pairs']}"))
    local, full = _local_pieces(params), dict(tree.paths(rp))
    worst = []
    for path, decl in tree.paths(plan.stage_model.defs, is_leaf=is_decl):
        want = full[path].detach()
        if layout is not None:
            want = want[layout.leaf_slice(path, decl)]
        err = _close(local[path], want)
        if err:
            worst.append(f"{path}: {err}")
    res[f"{tag} params after {steps} steps"] = "; ".join(worst) or None
    if mesh.rank("pp") == 0 and layers is None:  # even split: the first stage is what the estimate describes
        res.update(_check_memory(plan, params, state, cfg, mesh, "plain", tag))
    return res


def _check_lora_ep(rank, world, sizes):
    """LoRA on attention and on the experts (one adapter per expert) under expert parallel: the
    composite expert weights are cut on the expert dim and wrapped whole; loss and every adapter
    gradient equal one process."""
    import torch.distributed as dist
    from pmodel import lora as L
    from pmodel.parallel import Mesh, parallelize
    from pmodel.parallel.layout import layout_of
    mesh = Mesh.build(**sizes)
    tag = "x".join(f"{k}{v}" for k, v in sizes.items()) + " lora"
    lm = L.lora(build(CFG), rank=4, alpha=8, targets="all")
    full = pmodel.init(lm, seed=0)
    g = torch.Generator().manual_seed(1)
    for _, n in tree.paths(full, is_leaf=L.is_lora):
        if L.is_lora(n):
            with torch.no_grad():
                n.b.copy_(torch.randn(n.b.shape, generator=g) * 0.05)
    plan = parallelize(lm, optim.sgd(0.1), mesh)
    params = plan.shard(full)
    mbs, per_rank = _batches(2 * mesh.size("ep"), seed=7), 2
    n = sum(int(mb["labels"].numel()) for mb in mbs)
    ref = sum(lm.loss(full, mb, num_tokens=n)[0] for mb in mbs)
    ref.backward()
    r = mesh.rank("ep")
    loss = sum(plan.model.loss(params, mb, num_tokens=n)[0] for mb in mbs[r * per_rank:(r + 1) * per_rank])
    loss.backward()
    layout = layout_of(plan.model)
    layout.sync_grads(plan.model.defs, params)
    tot = loss.detach().clone()
    dist.all_reduce(tot, group=mesh.group("ep"))
    res = {f"{tag} loss": _close(tot, ref.detach())}
    local, want = dict(tree.paths(params)), dict(tree.paths(full))
    compared = 0
    for path, decl in tree.paths(plan.model.defs, is_leaf=is_decl):
        if not decl.trainable:
            res[f"{tag} frozen {path}"] = None if local[path].grad is None else "has a gradient"
            continue
        res[f"{tag} grad {path}"] = _close(local[path].grad, want[path].grad[layout.leaf_slice(path, decl)])
        compared += ".experts." in path
    res[f"{tag} expert adapters compared"] = None if compared == 12 else f"{compared}"
    ex = local["layers.0.mlp.experts.gate_proj.a"]
    res[f"{tag} local expert adapters"] = None if ex.shape[0] == CFG.num_experts // mesh.size("ep") else str(ex.shape)
    return res


def _worker(rank, world):
    if world == 2:
        out = _check_layout(rank, world, {"ep": 2})
        out.update(_check_pipeline(rank, world, {"pp": 2}))
        out.update(_check_pipeline(rank, world, {"pp": 2}, schedule="zero-bubble", layers=(1, 3), pad=True,
                                   cfg=CFG.replace(num_layers=4, moe_aux_loss_type="per_layer")))
        out.update(_check_pipeline(rank, world, {"pp": 2}, schedule="interleaved", V=2, steps=0))
        out.update(_check_layout(rank, world, {"tp": 2}, sp=True, pad=True))
        out.update(_check_lora_ep(rank, world, {"ep": 2}))
        return out
    out = _check_layout(rank, world, {"ep": 2, "tp": 2})
    out.update(_check_layout(rank, world, {"ep": 2, "dp": 2}, zero=True))
    out.update(_check_pipeline(rank, world, {"ep": 2, "pp": 2}))
    out.update(_check_layout(rank, world, {"ep": 2, "tp": 2}, sp=True, pad=True))
    return out


@pytest.mark.multiproc
def test_ep2_equals_one_process():
    assert_all_ok(launch(_worker, 2))


@pytest.mark.multiproc
def test_ep2_tp2_and_ep2_dp2_zero_equal_one_process():
    assert_all_ok(launch(_worker, 4))


def test_refusals_name_the_reason():
    from pmodel.parallel.plan import layout_problems
    assert layout_problems(CFG, {"ep": 2, "pp": 2}) == []  # MoE x PP runs (the statistics cross stages)
    assert layout_problems(CFG, {"ep": 2, "tp": 2}, sequence_parallel=True) == []  # statistics summed over tp
    capped = CFG.replace(moe_capacity_factor=1.0)
    assert any("capacity" in x for x in layout_problems(capped, {"tp": 2}, sequence_parallel=True))
    assert any("not divisible" in x for x in layout_problems(CFG, {"ep": 3}))
    dense = CFG.replace(num_experts=0)
    assert any("mixture-of-experts" in x for x in layout_problems(dense, {"ep": 2}))
