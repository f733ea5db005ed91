"""Pipeline parallel vs the single-process model on gloo: loss, every gradient, 5 AdamW steps,
the recorded 1F1B order, uneven splits, interleaved, zero-bubble, TP x PP, DP x PP, recompute,
LoRA and tied embeddings inside stages, and stage checkpoints loaded under another split.

Each world size is launched once; the worker runs every check and reports them by name, and
each name is its own test case sharing that launch (``-k "pp2_zero_bubble"`` runs one world).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    # One check name on every rank (the stages hold different numbers of leaves).
    from pmodel import tree
    worst, n = 0.0, 0
    for path, x in tree.paths(pipe_params):
        if not x.requires_grad:
            continue
        if x.grad is None:
            checks[f"{name}: grads"] = f"{path}: no gradient"
            return
        worst = max(worst, _rel(x.grad, ref_grads[path]))
        n += 1
    checks[f"{name}: grads"] = None if (n and worst <= tol) else f"worst rel err {worst:.3e} over {n} leaves"


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
    from pmodel.remat import recompute

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

    # Reshardable checkpoints: save under the split [1, 3] (params and Adam state after a step),
    # load under [3, 1]: every leaf equals the single-process run's.
    import json
    from pathlib import Path

    from pmodel import optim, tree
    from pmodel.parallel import PipelineSpec, parallelize
    tmp = _shared_tmp(rank)
    batch = _batch(seed=3)
    mbs = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    runs = {}
    for split in ((1, 3), (3, 1)):
        plan = parallelize(model, optim.adamw(1e-2), mesh, pipeline=PipelineSpec(layers_per_stage=split))
        params = plan.init(7)
        runs[split] = (plan, params, plan.tx.init(params))
    plan, params, st = runs[(1, 3)]
    params, st, _ = plan.step(params, st, mbs)
    plan.save_checkpoint(tmp, 1, params, st)
    plan_b, pb, sb = runs[(3, 1)]
    pb, sb, man = plan_b.load_checkpoint(tmp, pb, sb)
    single = pmodel.train.train_step(model, optim.adamw(1e-2))
    ps = pmodel.init(model, seed=7)
    ss = single.init(ps)
    ps, ss, _ = single(ps, ss, mbs)
    full = dict(tree.paths(ps))
    bad = [p for p, x in tree.paths(pb) if (x - full[p]).abs().max() > 1e-6 * (1 + full[p].abs().max())]
    checks["checkpoint [1,3] -> [3,1]"] = None if not bad else f"differs: {bad[:3]}"
    mu = {p: x for p, x in tree.paths(ss.inner.inner)}
    got = {p: x for p, x in tree.paths(sb.inner.inner)}
    bad = [p for p in got if p in mu and (got[p] - mu[p]).abs().max() > 1e-6 * (1 + mu[p].abs().max())]
    missing = [p for p in got if p not in mu]
    checks["checkpoint [1,3] -> [3,1] optimizer state"] = None if not (bad or missing) else f"{bad[:3]} {missing[:3]}"
    pieces = json.loads((Path(tmp) / "iter_0000001" / f"rank_{rank:05d}.json").read_text())["pieces"]
    layers = sorted({int(p["param"].split(".")[1]) for p in pieces if p["kind"] == "params"
                     and p["param"].startswith("layers.")})
    checks["checkpoint manifest global layers"] = None if layers == ([0] if rank == 0 else [1, 2, 3]) else \
        f"rank {rank} wrote layers {layers}"
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
    from pmodel.parallel.tensor import shard_params, sync_replicated_grads, tensor_parallel
    mesh22 = Mesh.build(tp=2, pp=2)
    model4 = pmodel.families.preset("debug", num_layers=4)
    for sp in (False, True):
        tpm = tensor_parallel(model4, mesh22, sequence_parallel=sp)
        pipe = pipeline(tpm, mesh22, "1f1b", microbatches=2)
        params = pipe.init(seed=0)
        batch = _batch()
        loss, _ = pipe.forward_backward(params, batch)
        if sp:
            sync_replicated_grads(tpm.replace(defs=pipe.stage_defs()), params)
        ref_loss, _, ref_params = _reference(model4, batch)
        full = tree.map(lambda x: x.grad, ref_params)
        shards = dict(tree.paths(pipe.stage_params(shard_params(tpm, full))))
        name = f"tp2xpp2 sp={sp}"
        checks[f"{name}: loss"] = None if _rel(loss, ref_loss) <= TOL else f"{loss.item()} vs {ref_loss.item()}"
        worst = max(_rel(x.grad, shards[p]) for p, x in tree.paths(params) if x.requires_grad)
        checks[f"{name}: grads"] = None if worst <= TOL else f"worst rel err {worst:.3e}"

    # PP 2 x DP 2 with bucketed reduce-scatter and the distributed (ZeRO-1) optimizer: 5 steps.
    from pmodel import optim
    from pmodel.parallel import PipelineSpec, parallelize
    mesh_dp = Mesh.build(dp=2, pp=2)
    plan = parallelize(model4, optim.adamw(1e-3, weight_decay=0.1), mesh_dp, pipeline=PipelineSpec(),
                       distributed_optimizer=True, bucket_numel=20_000)
    params = plan.init(0)
    state = plan.tx.init(params)
    d = mesh_dp.rank("dp")
    for s in range(5):
        gb = _batch(seed=s)
        local = [{k: v[2 * d + j: 2 * d + j + 1] for k, v in gb.items()} for j in range(2)]
        params, state, _ = plan.step(params, state, local)
    _, _, ref = _reference(model4, _batch(seed=0), steps=5)
    refp = dict(tree.paths(ref))
    worst = max(_rel(x.detach(), refp[p].detach()) for p, x in tree.paths(params))
    checks["pp2xdp2 distributed optimizer: 5 adamw steps params"] = None if worst <= TOL else f"worst {worst:.3e}"
    return checks


def _run_checks(*names: str) -> tuple[str, ...]:
    """The names ``_check_run`` reports for each run name."""
    return tuple(f"{n}: {c}" for n in names for c in ("loss", "grads"))


# Every check the workers report, listed so that pytest collects them without launching (one
# test case each; ``worlds`` in conftest.py launches each world once). Keep in sync with the
# workers: test_*_checks_are_listed fails on an unlisted or a missing name.
_RECOMPUTE = ("{'granularity': 'full'}", "{'granularity': 'full', 'method': 'block', 'num_layers': 1}",
              "{'granularity': 'selective'}")
CHECKS_2 = (
    *_run_checks("pp2 1f1b"), "pp2 M4 recorded schedule == 1F1B",
    *_run_checks("pp2 uneven [1,3]", "pp2 uneven [3,1] M=2", "pp2 interleaved V=2"),
    "interleaved ran every chunk F and B once",
    *_run_checks("pp2 zero-bubble"), "zero-bubble: each W after its B",
    *_run_checks("pp2 zero-bubble uneven [1,3]", "pp2 1f1b no padding M=1"),
    *_run_checks(*(f"pp2 recompute {kw}" for kw in _RECOMPUTE)),
    *_run_checks("pp2 interleaved + recompute"),
    *_run_checks(*(f"pp2 zero-bubble + recompute {kw}" for kw in (_RECOMPUTE[0], _RECOMPUTE[2]))),
    *_run_checks("pp2 lora", "pp2 tied embeddings", "pp2 tied zero-bubble"),
    "pp2 1f1b: 5 adamw steps params", "pp2 zero-bubble: 5 adamw steps params",
    "pp2 interleaved: 5 adamw steps params",
    "pp2 zero-bubble float64: 5 adamw steps params", "pp2 zero-bubble float64: 5 adamw steps updates",
    "pp2 interleaved float64: 5 adamw steps params", "pp2 interleaved float64: 5 adamw steps updates",
    "checkpoint [1,3] -> [3,1]", "checkpoint [1,3] -> [3,1] optimizer state", "checkpoint manifest global layers",
)
CHECKS_4 = (
    *_run_checks("pp4 1f1b"), "pp4 recorded 1F1B",
    *_run_checks("pp4 uneven [1,3,2,2]", "pp4 interleaved V=2", "pp4 zero-bubble M=6"),
    "pp4 1f1b uneven: 5 adamw steps params",
    "pp4 1f1b uneven float64: 5 adamw steps params", "pp4 1f1b uneven float64: 5 adamw steps updates",
    *_run_checks("tp2xpp2 sp=False", "tp2xpp2 sp=True"),
    "pp2xdp2 distributed optimizer: 5 adamw steps params",
)


@pytest.mark.multiproc
@pytest.mark.parametrize("check", CHECKS_2)
def test_pipeline_two_ranks(worlds, check):
    worlds.assert_check(worlds.results(_worker2, 2, timeout_s=600), check)


@pytest.mark.multiproc
def test_pipeline_two_ranks_checks_are_listed(worlds):
    worlds.assert_listed(worlds.results(_worker2, 2, timeout_s=600), CHECKS_2)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS_4)
def test_pipeline_four_ranks(worlds, check):
    worlds.assert_check(worlds.results(_worker4, 4, timeout_s=600), check)


@pytest.mark.multiproc
@pytest.mark.slow
def test_pipeline_four_ranks_checks_are_listed(worlds):
    worlds.assert_listed(worlds.results(_worker4, 4, timeout_s=600), CHECKS_4)
