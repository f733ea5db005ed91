"""Pipeline parallel vs the single-process model on gloo: loss, every gradient, 5 AdamW steps,
the recorded 1F1B order, uneven splits, interleaved, zero-bubble, TP x PP, DP x PP, recompute,
LoRA and tied embeddings inside stages, and stage checkpoints loaded under another split.

Each world size is launched once; the worker runs every check and reports them by name.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist import assert_all_ok, launch  # noqa: E402

TOL = 1e-5  # relative (per tensor: ||a - b|| / ||b||), as the acceptance asks


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).norm().item()
    n = b.double().norm().item()
    return d / n if n > 0 else d


def _batch(B=4, T=16, V=512, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    batch = {"tokens": tokens, "labels": labels}
    if pad:
        am = torch.ones(B, T, dtype=torch.long)
        am[1, :4] = 0  # left padding in one row: masks and positions go through make_context
        labels[1, :4] = -100
        batch["attention_mask"] = am
    return batch


def _reference(model, batch, seed=0, steps=0, lr=1e-3):
    """Single-process loss and grads (and params after ``steps`` AdamW steps)."""
    import pmodel
    from pmodel import optim, tree
    params = pmodel.init(model, seed)
    loss, _ = model.loss(params, batch)
    loss.backward()
    grads = {p: x.grad.clone() for p, x in tree.paths(params) if x.grad is not None}
    if steps:
        tx = optim.adamw(lr, weight_decay=0.1)
        state = tx.init(params)
        for s in range(steps):
            if s:
                for x in tree.leaves(params):
                    x.grad = None
                model.loss(params, _batch(seed=s))[0].backward()
            g = tree.map(lambda x: x.grad, params)
            upd, state = tx.update(g, state, params)
            optim.apply_updates(params, upd)
    return loss.detach(), grads, params


def _compare_grads(pipe_params, ref_grads, checks, name, tol=TOL):
    from pmodel import tree
    worst, n = 0.0, 0
    for path, x in tree.paths(pipe_params):
        if not x.requires_grad:
            continue
        if x.grad is None:
            checks[f"{name}: {path}"] = "no gradient"
            return
        worst = max(worst, _rel(x.grad, ref_grads[path]))
        n += 1
    checks[f"{name}: grads ({n} leaves)"] = None if (n and worst <= tol) else f"worst rel err {worst:.3e} over {n}"


def _check_run(model, mesh, checks, name, *, microbatches=4, schedule="1f1b", layers=None, V=1,
               batch=None, record=None):
    from pmodel.parallel.pipeline import pipeline
    batch = batch or _batch()
    pipe = pipeline(model, mesh, schedule, microbatches=microbatches, layers_per_stage=layers, virtual_stages=V)
    params = pipe.init(seed=0)
    loss, aux = pipe.forward_backward(params, batch, record=record)
    ref_loss, ref_grads, _ = _reference(model, batch)
    checks[f"{name}: loss"] = None if _rel(loss, ref_loss) <= TOL else f"{loss.item()} vs {ref_loss.item()}"
    _compare_grads(params, ref_grads, checks, name)
    return pipe, params


def _steps_check(model, mesh, checks, name, schedule="1f1b", layers=None, V=1, microbatches=4, steps=5,
                 updates_fp32=False):
    from pmodel import optim, tree
    from pmodel.parallel.pipeline import pipeline
    pipe = pipeline(model, mesh, schedule, microbatches=microbatches, layers_per_stage=layers, virtual_stages=V)
    params = pipe.init(seed=0)
    tx = optim.adamw(1e-3, weight_decay=0.1)
    state = tx.init(params)
    for s in range(steps):
        for x in tree.leaves(params):
            x.grad = None
        pipe.forward_backward(params, _batch(seed=s))
        upd, state = tx.update(tree.map(lambda x: x.grad, params), state, params)
        optim.apply_updates(params, upd)
    _, _, ref = _reference(model, _batch(seed=0), steps=steps)
    refp = dict(tree.paths(ref))
    worst = max(_rel(x.detach(), refp[p].detach()) for p, x in tree.paths(params))
    # Compare the step delta, not just the params (the params barely move in 5 steps).
    init = dict(tree.paths(pipe.init(seed=0)))
    dworst = max(_rel(x.detach() - init[p], refp[p].detach() - init[p]) for p, x in tree.paths(params)
                 if x.requires_grad)
    checks[f"{name}: {steps} adamw steps params"] = None if worst <= TOL else f"worst rel err {worst:.3e}"
    if model.config.dtype == torch.float64 or updates_fp32:
        # Adam divides by sqrt(v), so every element's update has the same size and the fp32
        # rounding of small, cancelling gradient entries (micro-batch summation order) shows up
        # at ~1e-5 of the update; in float64 the update itself must agree.
        checks[f"{name}: {steps} adamw steps updates"] = None if dworst <= TOL else f"worst rel err {dworst:.3e}"


def _expected_1f1b(rank, pp, M):
    warm = min(pp - rank - 1, M)
    out = [("F", i) for i in range(warm)]
    for i in range(M - warm):
        out += [("F", warm + i), ("B", i)]
    return out + [("B", i) for i in range(M - warm, M)]


def _worker2(rank, world):
    import pmodel
    from pmodel.lora import lora
    from pmodel.parallel.mesh import Mesh
    from pmodel.parallel.pipeline import pipeline
    from pmodel.recompute import recompute

    torch.manual_seed(0)
    checks: dict = {}
    mesh = Mesh.build(pp=2)
    model = pmodel.families.preset("debug", num_layers=4)

    record: list = []
    _check_run(model, mesh, checks, "pp2 1f1b", record=record)
    got = [(op.kind, op.microbatch) for op in record]
    # The hand-written PipeDream-flush order for PP=2, M=4.
    hand = {0: [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)],
            1: [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]}[rank]
    checks["pp2 M4 recorded schedule == 1F1B"] = None if got == hand == _expected_1f1b(rank, 2, 4) else str(got)

    _check_run(model, mesh, checks, "pp2 uneven [1,3]", layers=[1, 3])
    _check_run(model, mesh, checks, "pp2 uneven [3,1] M=2", layers=[3, 1], microbatches=2)
    rec_i: list = []
    _check_run(model, mesh, checks, "pp2 interleaved V=2", schedule="interleaved", V=2, record=rec_i)
    checks["interleaved ran every chunk F and B once"] = None if sorted(rec_i) == sorted(
        [(k, j, c) for k in "FB" for j in range(4) for c in range(2)]) else str(rec_i)
    rec_z: list = []
    _check_run(model, mesh, checks, "pp2 zero-bubble", schedule="zero-bubble", record=rec_z)
    pos = {(op.kind, op.microbatch): i for i, op in enumerate(rec_z)}
    checks["zero-bubble: each W after its B"] = None if all(
        pos[("W", j)] > pos[("B", j)] for j in range(4)) else str(rec_z)
    _check_run(model, mesh, checks, "pp2 zero-bubble uneven [1,3]", schedule="zero-bubble", layers=[1, 3])
    _check_run(model, mesh, checks, "pp2 1f1b no padding M=1", microbatches=1, batch=_batch(pad=False))

    for kw in (dict(granularity="full"), dict(granularity="full", method="block", num_layers=1),
               dict(granularity="selective")):
        _check_run(recompute(model, **kw), mesh, checks, f"pp2 recompute {kw}")
    _check_run(recompute(model, "full", "uniform", 2), mesh, checks, "pp2 interleaved + recompute",
               schedule="interleaved", V=2)
    for kw in (dict(granularity="full"), dict(granularity="selective")):
        _check_run(recompute(model, **kw), mesh, checks, f"pp2 zero-bubble + recompute {kw}", schedule="zero-bubble")

    lmodel = lora(model, rank=4, alpha=8.0)
    _check_run(lmodel, mesh, checks, "pp2 lora")
    tied = pmodel.families.preset("debug", num_layers=4, tie_embeddings=True)
    _check_run(tied, mesh, checks, "pp2 tied embeddings")
    _check_run(tied, mesh, checks, "pp2 tied zero-bubble", schedule="zero-bubble")

    _steps_check(model, mesh, checks, "pp2 1f1b", updates_fp32=False)
    _steps_check(model, mesh, checks, "pp2 zero-bubble", schedule="zero-bubble", updates_fp32=False)
    _steps_check(model, mesh, checks, "pp2 interleaved", schedule="interleaved", V=2, updates_fp32=False)
    m64 = pmodel.families.preset("debug", num_layers=4, dtype=torch.float64)
    _steps_check(m64, mesh, checks, "pp2 zero-bubble float64", schedule="zero-bubble")
    _steps_check(m64, mesh, checks, "pp2 interleaved float64", schedule="interleaved", V=2)

    # Stage checkpoints: save under [1, 3], load under [3, 1]: equal to the single-process init.
    from pmodel import tree
    tmp = _shared_tmp(rank)
    a = pipeline(model, mesh, "1f1b", microbatches=2, layers_per_stage=[1, 3])
    pa = a.init(seed=7)
    a.save(pa, tmp)
    torch.distributed.barrier()
    b = pipeline(model, mesh, "1f1b", microbatches=2, layers_per_stage=[3, 1])
    pb = b.init(seed=0)  # different values, overwritten by load
    b.load(pb, tmp)
    full = dict(tree.paths(pmodel.init(model, seed=7)))
    bad = [p for p, x in tree.paths(pb) if not torch.equal(x, full[p])]
    checks["checkpoint [1,3] -> [3,1]"] = None if not bad else f"differs: {bad[:3]}"
    checks["checkpoint manifest global layers"] = None if sorted(
        int(p.split(".")[1]) for p, _ in tree.paths(pb) if p.startswith("layers.")) and set(
        int(p.split(".")[1]) for p, _ in tree.paths(pb) if p.startswith("layers.")) == set(b.layers) else "wrong layers"
    return checks


def _shared_tmp(rank):
    # Both ranks must agree on the directory: rank 0 makes it and broadcasts the name.
    import torch.distributed as dist
    obj = [tempfile.mkdtemp(prefix="pp_ckpt_") if rank == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    return obj[0]


def _worker4(rank, world):
    import pmodel
    from pmodel import tree
    from pmodel.parallel.mesh import Mesh

    torch.manual_seed(0)
    checks: dict = {}
    mesh = Mesh.build(pp=4)
    model8 = pmodel.families.preset("debug", num_layers=8)
    record: list = []
    _check_run(model8, mesh, checks, "pp4 1f1b", record=record)
    checks["pp4 recorded 1F1B"] = None if [(o.kind, o.microbatch) for o in record] == _expected_1f1b(
        rank, 4, 4) else str(record)
    _check_run(model8, mesh, checks, "pp4 uneven [1,3,2,2]", layers=[1, 3, 2, 2])
    _check_run(model8, mesh, checks, "pp4 interleaved V=2", schedule="interleaved", V=2)
    _check_run(model8, mesh, checks, "pp4 zero-bubble M=6", schedule="zero-bubble", microbatches=6,
               batch=_batch(B=6))
    _steps_check(model8, mesh, checks, "pp4 1f1b uneven", layers=[2, 1, 1, 4], updates_fp32=False)
    _steps_check(pmodel.families.preset("debug", num_layers=8, dtype=torch.float64), mesh, checks,
                 "pp4 1f1b uneven float64", layers=[2, 1, 1, 4])

    # TP 2 x PP 2 (with and without sequence parallel).
    from pmodel.parallel.pipeline import pipeline
    from pmodel.parallel.tensor import shard_params, sync_sequence_parallel_grads, tensor_parallel
    mesh22 = Mesh.build(tp=2, pp=2)
    model4 = pmodel.families.preset("debug", num_layers=4)
    for sp in (False, True):
        tpm = tensor_parallel(model4, mesh22, sequence_parallel=sp)
        pipe = pipeline(tpm, mesh22, "1f1b", microbatches=2)
        params = pipe.init(seed=0)
        batch = _batch()
        loss, _ = pipe.forward_backward(params, batch)
        if sp:
            sync_sequence_parallel_grads(tpm.replace(defs=pipe.stage_defs()), params)
        ref_loss, _, ref_params = _reference(model4, batch)
        full = tree.map(lambda x: x.grad, ref_params)
        shards = dict(tree.paths(pipe.stage_params(shard_params(tpm, full))))
        name = f"tp2xpp2 sp={sp}"
        checks[f"{name}: loss"] = None if _rel(loss, ref_loss) <= TOL else f"{loss.item()} vs {ref_loss.item()}"
        worst = max(_rel(x.grad, shards[p]) for p, x in tree.paths(params) if x.requires_grad)
        checks[f"{name}: grads"] = None if worst <= TOL else f"worst rel err {worst:.3e}"

    # PP 2 x DP 2 with bucketed reduce-scatter and the distributed (ZeRO-1) optimizer: 5 steps.
    from pmodel import optim
    from pmodel.parallel.data import DataParallel
    from pmodel.parallel.optimizer import distributed_optimizer
    mesh_dp = Mesh.build(dp=2, pp=2)
    pipe = pipeline(model4, mesh_dp, "1f1b", microbatches=2)
    params = pipe.init(seed=0)
    dpar = DataParallel(params, mesh_dp, bucket_numel=20_000, reduce="reduce_scatter")
    tx = distributed_optimizer(optim.adamw(1e-3, weight_decay=0.1), mesh_dp, bucket_numel=20_000)
    state = tx.init(params)
    d = mesh_dp.rank("dp")
    for s in range(5):
        dpar.zero_grad()
        gb = _batch(seed=s)
        n_global = (gb["labels"] != -100).sum()
        local = {k: v[2 * d: 2 * d + 2] for k, v in gb.items()}
        pipe.forward_backward(params, local, num_tokens=n_global)
        dpar.finish()
        upd, state = tx.update(tree.map(lambda x: x.grad, params), state, params)
        optim.apply_updates(params, upd)
    _, _, ref = _reference(model4, _batch(seed=0), steps=5)
    refp = dict(tree.paths(ref))
    worst = max(_rel(x.detach(), refp[p].detach()) for p, x in tree.paths(params))
    checks["pp2xdp2 distributed optimizer: 5 adamw steps params"] = None if worst <= TOL else f"worst {worst:.3e}"
    return checks


@pytest.mark.multiproc
def test_pipeline_two_ranks():
    assert_all_ok(launch(_worker2, 2, timeout_s=600))


@pytest.mark.multiproc
@pytest.mark.slow
def test_pipeline_four_ranks():
    assert_all_ok(launch(_worker4, 4, timeout_s=600))
