"""Training checkpoints: round trip, refusal messages, a save killed halfway, and bit-exact
resume in a new process (20 steps straight == 10 + resume + 10)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pmodel
from pmodel import optim, tree
from pmodel.checkpoint import state as ckpt

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _setup(seed=0):
    model = pmodel.families.preset("debug")
    params = pmodel.init(model, seed=seed)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-3))
    return model, params, tx, tx.init(params)


def _step(model, params, tx, st):
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    b = {"tokens": x[:, :-1], "labels": x[:, 1:]}
    return pmodel.train.train_step(model, tx)(params, st, b)


def test_round_trip_restores_params_optimizer_rng_and_position(tmp_path):
    model, params, tx, st = _setup()
    params, st, _ = _step(model, params, tx, st)
    ckpt.save(tmp_path, 1, params=params, opt_state=st, config=model.config.to_dict(),
              data={"consumed_samples": 2}, extra={"note": "x"})
    expect_next = torch.rand(3)
    _, p2, _, s2 = _setup(seed=5)
    ids_before = [id(t) for t in tree.leaves(p2)]
    p2, s2, man = ckpt.load(tmp_path, params=p2, opt_state=s2, config=model.config.to_dict())
    assert torch.equal(torch.rand(3), expect_next)  # torch RNG restored to the saved point
    assert man["step"] == 1 and man["data"] == {"consumed_samples": 2} and man["extra"] == {"note": "x"}
    assert [id(t) for t in tree.leaves(p2)] == ids_before  # filled in place
    for (k, a), (_, b) in zip(tree.paths(params), tree.paths(p2)):
        assert torch.equal(a, b) and b.requires_grad == a.requires_grad, k
    for (k, a), (_, b) in zip(tree.paths(st), tree.paths(s2)):
        assert torch.equal(a, b), k


def test_config_mismatch_names_fields_and_key_errors(tmp_path):
    model, params, tx, st = _setup()
    ckpt.save(tmp_path, 3, params=params, opt_state=st, config=model.config.to_dict())
    other = model.config.replace(num_layers=3, rope_theta=500000.0)
    with pytest.raises(ckpt.CheckpointError, match=r"num_layers: checkpoint=2 current=3.*rope_theta"):
        ckpt.load(tmp_path, params=params, config=other.to_dict())
    bad = dict(params)
    bad["extra_leaf"] = torch.zeros(2)
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['extra_leaf'\]"):
        ckpt.load(tmp_path, params=bad)
    wrong = tree.map(lambda t: t, params)
    wrong["final_norm"]["weight"] = torch.zeros(5)
    with pytest.raises(ckpt.CheckpointError, match=r"final_norm.weight.*expected"):
        ckpt.load(tmp_path, params=wrong)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.load(tmp_path / "nowhere", params=params)


def test_save_killed_halfway_leaves_previous_checkpoint(tmp_path):
    model, params, tx, st = _setup()
    ckpt.save(tmp_path, 1, params=params, opt_state=st, config=model.config.to_dict())
    before = {k: v.clone() for k, v in tree.paths(params)}
    script = textwrap.dedent(f"""
        import os, signal, torch, pmodel
        from pmodel import optim
        from pmodel.checkpoint import state as ckpt
        model = pmodel.families.preset("debug")
        params = pmodel.init(model, seed=7)
        tx = optim.adamw(1e-3)
        def die(path):
            if path.name == "params.safetensors":   # params written, optimizer not yet
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save({str(tmp_path)!r}, 2, params=params, opt_state=tx.init(params),
                  config=model.config.to_dict(), on_file_written=die)
    """)
    r = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert any(p.name.startswith(".tmp-iter_0000002") for p in tmp_path.iterdir())  # the half-written save
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001"
    assert ckpt.latest(tmp_path).name == "iter_0000001"
    _, p2, _, s2 = _setup(seed=9)
    p2, s2, man = ckpt.load(tmp_path, params=p2, opt_state=s2, config=model.config.to_dict())
    assert man["step"] == 1
    for k, v in tree.paths(p2):
        assert torch.equal(v, before[k]), k
    ckpt.save(tmp_path, 2, params=p2, opt_state=s2, config=model.config.to_dict())  # next save cleans up
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
    assert ckpt.latest(tmp_path).name == "iter_0000002"


def _pretrain(*extra):
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--model", "debug", "--seq-length", "16",
           "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3", "--min-lr", "3e-4",
           "--lr-warmup-iters", "3", "--lr-decay-style", "cosine", "--weight-decay", "0.1",
           "--train-iters", "20", "--mock-data", "--log-interval", "1", "--no-progress", "--seed", "3", *extra]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, Path(path).read_text().splitlines()) if "loss" in r}


@pytest.mark.slow
def test_resume_in_new_process_is_bit_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _pretrain("--save", str(a))
    # 10 steps, then a new process resumes from the checkpoint and runs to 20
    _pretrain("--save", str(b), "--save-interval", "10", "--train-iters", "10", "--lr-decay-iters", "20")
    out = _pretrain("--save", str(b), "--load", str(b))
    assert "resumed from" in out and "at iteration 10" in out
    pa, pb = load_file(a / "iter_0000020" / "params.safetensors"), load_file(b / "iter_0000020" / "params.safetensors")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    oa, ob = load_file(a / "iter_0000020" / "optimizer.safetensors"), load_file(b / "iter_0000020" / "optimizer.safetensors")
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k
    la, lb = _losses(a / "metrics.jsonl"), _losses(b / "metrics.jsonl")
    assert sorted(la) == sorted(lb) == list(range(1, 21))
    assert all(la[s] == lb[s] for s in la), [(s, la[s], lb[s]) for s in la if la[s] != lb[s]]
