"""Resilience (pmodel.resilience): the per-step integrity check with a redo from the local copy,
the replica checksum, the survivors' decision of a failure checkpoint, and (slow, multiproc) a
rank killed with SIGKILL in the middle of step 7 under torch.distributed.run --max-restarts 1:
the survivors write the step-6 checkpoint, the launcher restarts the job, and the final
parameters and optimizer state equal an uninterrupted run bitwise; on DP4 and on TP2 x DP2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pmodel
from pmodel import optim, tree
from pmodel.resilience import IntegrityConfig, LocalCopy, Resilience, decide_failure_step, state_checksum
from pmodel.train import LoopConfig, train, train_step

from _dist import assert_all_ok, free_port, launch

ROOT = Path(__file__).resolve().parents[1]


def _batches(cfg, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
        out.append([{"tokens": x[:1, :-1], "labels": x[:1, 1:]}, {"tokens": x[1:, :-1], "labels": x[1:, 1:]}])
    return out


def _run(inject_at=None, steps=6, integrity=True):
    model = pmodel.families.preset("debug")
    fired = []

    def hook(params, index):
        # The second micro-batch of step `inject_at` finds a NaN in a weight: a fault in the middle
        # of the step (the first micro-batch's gradients are already accumulated).
        if index == 2 * inject_at + 1 and not fired:
            fired.append(index)
            with torch.no_grad():
                params["layers"][0]["mlp"]["up_proj"]["weight"][3, 5] = float("nan")
        return params
    step = train_step(model, optim.adamw(1e-3), max_grad_norm=1.0,
                      micro_batch_hook=hook if inject_at is not None else None)
    params = pmodel.init(model, seed=0)
    opt_state = step.init(params)
    data = _batches(model.config, steps)
    res = Resilience(step.plan, integrity=IntegrityConfig()) if integrity else None
    lines = []
    params, opt_state, st, hist = train(step, params, opt_state, lambda start: iter(data), log=lines.append,
                                        loop=LoopConfig(train_iters=steps, log_interval=1, progress=False),
                                        resilience=res)
    return params, opt_state, hist, lines, fired


def test_nan_injected_mid_step_is_detected_and_the_redo_gives_the_clean_run():
    clean, clean_state, clean_hist, _, _ = _run()
    got, got_state, hist, lines, fired = _run(inject_at=3)
    assert fired == [7]
    redo = [h for h in hist if h.get("event") == "redo"]
    assert len(redo) == 1 and redo[0]["step"] == 4 and "non-finite" in redo[0]["problem"], redo
    assert any("iter 4: integrity check failed" in x and "redoing" in x for x in lines), lines
    losses = [(h["step"], h["loss"], h["grad_norm"]) for h in hist if "loss" in h]
    assert losses == [(h["step"], h["loss"], h["grad_norm"]) for h in clean_hist if "loss" in h]
    for (k, a), (_, b) in zip(tree.paths(got), tree.paths(clean)):
        assert torch.equal(a, b), k
    for a, b in zip(tree.leaves(got_state), tree.leaves(clean_state)):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_without_the_check_the_nan_spreads():
    got, *_ = _run(inject_at=3, integrity=False)
    assert not all(bool(torch.isfinite(t).all()) for t in tree.leaves(got))


def test_a_fault_that_repeats_is_not_redone_forever():
    model = pmodel.families.preset("debug")

    def hook(params, index):
        if index == 3:
            with torch.no_grad():
                params["layers"][0]["mlp"]["up_proj"]["weight"][0, 0] = float("nan")
        return params
    step = train_step(model, optim.adamw(1e-3), micro_batch_hook=hook)
    params = pmodel.init(model, seed=0)
    res = Resilience(step.plan, integrity=IntegrityConfig(max_redo=2))
    with pytest.raises(RuntimeError, match=r"iteration 2: integrity check failed again after 2 redo"):
        train(step, params, step.init(params), lambda s: iter(_batches(model.config, 3)), resilience=res,
              loop=LoopConfig(train_iters=3, progress=False), log=lambda s: None)


def test_local_copy_restores_in_place_and_checksum_sees_one_bit():
    p = {"w": torch.randn(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    s = {"mu": torch.randn(5), "count": torch.tensor(3)}
    lc = LocalCopy()
    lc.take(0, p, s)
    c0 = state_checksum(s)
    w, mu = p["w"], s["mu"]
    p["w"].add_(1.0)
    s["mu"].view(torch.int32)[2] ^= 1  # one flipped bit
    assert state_checksum(s) != c0
    lc.restore(p, s)
    assert p["w"] is w and s["mu"] is mu and state_checksum(s) == c0


def test_failure_decision_takes_the_newest_step_held_completely():
    # DP4 replica: halves {0, 1} and {2, 3}, 2 shards each. Rank 2 is dead.
    a = lambda step, shard, ok=True: {"step": step, "ok": ok, "tp": 0, "pp": 0, "shard": shard}  # noqa: E731
    d = decide_failure_step({0: a(6, 0), 1: a(6, 1), 3: a(6, 1)}, [2], tp=1, pp=1, nshards=2)
    assert d["step"] == 6 and d["writers"] == [0, 1, 3] and d["params"] == [0] and d["shards"] == [0, 1]
    # Half A completed step 7 (its all-gather did not need rank 2); rank 3 is back at 6.
    d = decide_failure_step({0: a(7, 0), 1: a(7, 1), 3: a(6, 1)}, [2], tp=1, pp=1, nshards=2)
    assert d["step"] == 7 and d["writers"] == [0, 1] and d["lead"] == 0
    # Shard 0 only on a rank whose update was interrupted without a local copy: nothing complete.
    d = decide_failure_step({0: a(6, 0, ok=False), 1: a(6, 1), 3: a(6, 1)}, [2], tp=1, pp=1, nshards=2)
    assert d["step"] is None and "no step is held completely" in d["reason"]


def _checksum_worker(rank, world):
    from pmodel.parallel import Mesh, parallelize
    mesh = Mesh.build()
    model = pmodel.families.preset("debug")
    out = {}
    finals = []
    for corrupt in (False, True):
        plan = parallelize(model, optim.adamw(1e-3), mesh, distributed_optimizer=True, high_availability=True,
                           max_grad_norm=1.0, bucket_numel=4000)
        params = plan.init(0)
        opt_state = plan.tx.init(params)
        calls = []

        def step(p, o, b):
            p, o, m = plan.step(p, o, b)
            calls.append(1)
            if corrupt and len(calls) == 3 and rank == 1:
                # a flipped bit in one copy of an Adam moment shard, after the update
                leaf = next(t for t in tree.leaves(o.inner.inner) if isinstance(t, torch.Tensor) and t.numel() > 8)
                leaf.view(-1).view(torch.int32)[5] ^= 1 << 20
            return p, o, m
        data = [b[rank::world] for b in _batches(model.config, 4, seed=1)]
        res = Resilience(plan, integrity=IntegrityConfig(nonfinite=True, checksum=True))
        lines = []
        params, opt_state, _, hist = train(step, params, opt_state, lambda s: iter(data), resilience=res,
                                           loop=LoopConfig(train_iters=4, progress=False), log=lines.append)
        redo = [h for h in hist if h.get("event") == "redo"]
        out[f"corrupt={corrupt} redo"] = (None if len(redo) == int(corrupt) and (not corrupt or (
            redo[0]["step"] == 3 and "replica optimizer shards differ" in redo[0]["problem"])) else str(redo))
        finals.append([t.clone() for t in tree.leaves(params)] + [t.clone() for t in tree.leaves(opt_state.inner)
                                                                  if isinstance(t, torch.Tensor)])
    out["bitwise equal to the clean run"] = (None if all(torch.equal(a, b) for a, b in zip(*finals))
                                             else "final state differs")
    return out


@pytest.mark.multiproc
def test_replica_checksum_catches_a_flipped_bit_and_the_redo_gives_the_clean_run():
    assert_all_ok(launch(_checksum_worker, 2))


# ----------------------------------------------------------------------------- kill -9 under torchrun
HA_ARGS = ["--model", "debug", "--num-layers", "4", "--mock-data", "--seq-length", "32", "--micro-batch-size", "1",
           "--global-batch-size", "8", "--lr", "1e-3", "--log-interval", "1", "--no-progress", "--train-iters", "10",
           "--use-distributed-optimizer", "--enable-high-availability", "--enable-optimizer-state-local-copy",
           "--distributed-timeout-minutes", "0.1", "--use-deter-comp"]


def _torchrun(tmp, name, kill_at=None, timeout=240, extra=()):
    d = tmp / name
    d.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HA_KILL_RANK="2", HA_KILL_STEP="7", HA_KILL_AT=kill_at or "none")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--max-restarts", "1",
           "--monitor-interval", "0.5", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           str(ROOT / "tests" / "_ha_kill.py"), *HA_ARGS, *extra, "--save", "ck", "--load", "ck",
           "--metrics-file", "m.jsonl"]
    p = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    recs = [json.loads(x) for x in (d / "m.jsonl").read_text().splitlines()]
    return d, out, [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in recs if "loss" in r]


def _final(d):
    from safetensors.torch import load_file
    out = {}
    for r in range(4):
        t = load_file(d / "ck" / "iter_0000010" / f"rank_{r:05d}.safetensors")
        out.update({(r, k): v for k, v in t.items() if not k.startswith("rng/")})
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_kill9_mid_step7_survivors_checkpoint_and_the_restarted_job_equals_an_uninterrupted_run(tmp_path):
    ref_dir, _, ref = _torchrun(tmp_path, "ref")
    assert [s for s, *_ in ref] == list(range(1, 11))
    ref_final = _final(ref_dir)
    assert any(k.startswith("state/") for _, k in ref_final)
    # (a) rank 2 dies after its step-7 backward, before the gradient reduction: every survivor
    # is at step 6 with untouched state; ranks 0, 1 (one replica half) and 3 write step 6.
    # (b) rank 2 dies after updating its optimizer shards, before their all-gather: its half
    # partner (rank 3) is stopped in its update and rolls back from the local copy; the other
    # half completed step 7 and holds it completely, so the checkpoint is step 7.
    for kill_at, step, writers in (("reduce", 6, "[0, 1, 3]"), ("update", 7, "[0, 1]")):
        d, out, got = _torchrun(tmp_path, kill_at, kill_at=kill_at)
        assert f"failure checkpoint at iteration {step} written by ranks {writers} (dead or missing: [2])" in out, out
        assert f"resumed from ck/iter_{step:07d} at iteration {step}" in out, out
        assert "rank 3: failure at iteration" in out, out
        assert json.loads((d / "ck" / f"iter_{step:07d}" / "manifest.json").read_text())["step"] == step
        assert got == ref, (kill_at, got, ref)  # each step logged once, with the same bits
        fin = _final(d)
        assert sorted(fin) == sorted(ref_final)
        for k, v in ref_final.items():
            assert torch.equal(fin[k], v), (kill_at, k)


@pytest.mark.multiproc
@pytest.mark.slow
def test_kill9_mid_step7_at_tp2_x_dp2_equals_an_uninterrupted_run(tmp_path):
    """TP2 x DP2 (rank = tp + 2 dp): rank 2 is (tp 0, dp 1). With dp 2 the replica layout holds
    each tp slice's whole optimizer state on both dp ranks (one shard, two copies), so rank 0
    (tp 0, dp 0) holds everything rank 2 held, and the decision needs both tp slices.
    (a) killed after its step-7 backward, before the gradient reduction: the survivors are at
    step 6 and write it (rank 0 for tp 0, rank 1 for tp 1, rank 3 writes its replica too).
    (b) killed after its optimizer update of step 7: with one shard per half there is no
    all-gather across dp after the update, so the survivors finish step 7 (it is logged), fail
    in step 8 on the dead peer, and write step 7."""
    tp = ["--tensor-model-parallel-size", "2"]
    ref_dir, out, ref = _torchrun(tmp_path, "ref", extra=tp)
    assert "world 4 = pp 1 x dp 2 x tp 2" in out, out
    assert [s for s, *_ in ref] == list(range(1, 11))
    ref_final = _final(ref_dir)
    assert any(k.startswith("state/") for _, k in ref_final)
    for kill_at, step in (("reduce", 6), ("update", 7)):
        d, out, got = _torchrun(tmp_path, kill_at, kill_at=kill_at, extra=tp)
        assert f"rank 0: failure at iteration {step + 1} (inside steps)" in out, out
        assert f"failure checkpoint at iteration {step} written by ranks [0, 1, 3] (dead or missing: [2])" in out, out
        assert f"resumed from ck/iter_{step:07d} at iteration {step}" in out, out
        assert json.loads((d / "ck" / f"iter_{step:07d}" / "manifest.json").read_text())["step"] == step
        assert got == ref, (kill_at, got, ref)  # each step logged once, with the same bits
        fin = _final(d)
        assert sorted(fin) == sorted(ref_final)
        for k, v in ref_final.items():
            assert torch.equal(fin[k], v), (kill_at, k)


def _single_ha(tmp_path, local_copy, fail):
    import signal as sig
    from pmodel.checkpoint import sharded
    from pmodel.resilience import FailureCheckpoint, TrainingInterrupted
    model = pmodel.families.preset("debug")
    step = train_step(model, optim.adamw(1e-3))
    plan = step.plan
    params = pmodel.init(model, seed=0)
    opt_state = step.init(params)
    save = lambda st, p, o, writer=None: plan.save_checkpoint(tmp_path, st.step, p, o, writer=writer)  # noqa: E731
    res = Resilience(plan, failure=FailureCheckpoint(plan, save, peer_timeout_s=1.0, local_copy=local_copy))
    res.install_signal_handlers()
    calls = []

    def run(p, o, b):
        calls.append(1)
        if fail == "sigterm" and len(calls) == 3:
            os.kill(os.getpid(), sig.SIGTERM)  # handled: a stop request at the next step boundary
        if fail == "update" and len(calls) == 5:
            import pmodel.optim as po
            orig = po.apply_updates
            plan_mod = sys.modules["pmodel.parallel.plan"]

            def broken(params, updates):  # the optimizer state is updated, then the params update fails
                plan_mod.apply_updates = orig
                raise RuntimeError("lost a peer during the update")
            plan_mod.apply_updates = broken
        return plan.step(p, o, b)
    lines = []
    with pytest.raises(TrainingInterrupted) as ei:
        train(run, params, opt_state, lambda s: iter(_batches(model.config, 8)), resilience=res, log=lines.append,
              loop=LoopConfig(train_iters=8, progress=False))
    assert sig.getsignal(sig.SIGTERM) is not None and res._old_handlers == {}
    return ei.value, lines, sharded.latest(tmp_path)


def test_sigterm_stops_at_the_step_boundary_with_a_checkpoint(tmp_path):
    e, lines, last = _single_ha(tmp_path, False, "sigterm")
    assert e.step == 3 and last is not None and last.name == "iter_0000003", (lines, last)
    assert any("failure at iteration 3 (between steps): _StopRequested: signal 15" in x for x in lines), lines


def test_a_failure_inside_the_update_needs_the_local_copy(tmp_path):
    e, lines, last = _single_ha(tmp_path / "a", False, "update")
    assert e.step == 4 and last is None, lines
    assert any("none written: no step is held completely" in x for x in lines), lines
    e, lines, last = _single_ha(tmp_path / "b", True, "update")
    assert e.step == 4 and last is not None and last.name == "iter_0000004", lines


def test_the_rolled_back_checkpoint_equals_a_clean_one(tmp_path):
    from safetensors.torch import load_file
    _single_ha(tmp_path / "b", True, "update")
    model = pmodel.families.preset("debug")
    step = train_step(model, optim.adamw(1e-3))
    params = pmodel.init(model, seed=0)
    params, opt_state, st, _ = train(step, params, step.init(params), lambda s: iter(_batches(model.config, 8)),
                                     loop=LoopConfig(train_iters=4, progress=False), log=lambda s: None)
    step.plan.save_checkpoint(tmp_path / "c", 4, params, opt_state)
    a = load_file(tmp_path / "b" / "iter_0000004" / "rank_00000.safetensors")
    b = load_file(tmp_path / "c" / "iter_0000004" / "rank_00000.safetensors")
    keys = [k for k in b if not k.startswith("rng/")]
    assert keys and sorted(keys) == sorted(k for k in a if not k.startswith("rng/"))
    for k in keys:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("flags, msg", [
    (["--enable-optimizer-state-local-copy"], "of --enable-high-availability; add it"),
    (["--use-distributed-optimizer", "--enable-optimizer-state-local-copy"], "add it"),
    (["--use-distributed-optimizer", "--enable-high-availability", "--enable-optimizer-state-local-copy"],
     "written into --save, which pretrain.py was not given"),
    (["--use-distributed-optimizer", "--enable-high-availability", "--enable-optimizer-state-local-copy",
      "--save", "x"], "needs --distributed-timeout-minutes"),
    (["--distributed-timeout-minutes", "0"], "must be positive"),
    (["--integrity-checksum"], "needs --enable-high-availability"),
    (["--integrity-max-redo", "2"], "needs --integrity-check or --integrity-checksum"),
    (["--integrity-check", "--integrity-max-redo", "0"], "must be >= 1"),
])
def test_high_availability_flags_are_refused_with_the_reason(flags, msg):
    sys.path.insert(0, str(ROOT / "scripts"))
    import pretrain
    base = ["--model", "debug", "--mock-data", "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3",
            "--train-iters", "1"]
    with pytest.raises(SystemExit) as e:
        pretrain.main(base + flags)
    assert msg in str(e.value), str(e.value)
