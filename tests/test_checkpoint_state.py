"""Training checkpoints (pmodel.checkpoint.sharded, the one format; here on one process): round
trip, refusal messages, a save killed halfway, and bit-exact resume in a new process (20 steps
straight == 10 + resume + 10). Multi-process layouts and resharding: tests/test_layouts_cli.py."""
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
from pmodel.checkpoint import sharded as ckpt
from pmodel.checkpoint.state import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _setup(seed=0):
    model = pmodel.families.preset("debug")
    params = pmodel.init(model, seed=seed)
    step = pmodel.train.train_step(model, optim.adamw(1e-3), max_grad_norm=1.0)
    return model, params, step, step.init(params)


def _step(model, params, step, st):
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    b = {"tokens": x[:, :-1], "labels": x[:, 1:]}
    return step(params, st, b)


def test_round_trip_restores_params_optimizer_rng_and_position(tmp_path):
    model, params, step, st = _setup()
    params, st, _ = _step(model, params, step, st)
    ckpt.save(tmp_path, 1, params=params, opt_state=st, config=model.config.to_dict(),
              data={"consumed_samples": 2}, extra={"note": "x"})
    expect_next = torch.rand(3)
    _, p2, _, s2 = _setup(seed=5)
    ids_before = [id(t) for t in tree.leaves(p2)]
    p2, s2, man = ckpt.load(tmp_path, params=p2, opt_state=s2, config=model.config.to_dict())
    assert man["rng_restored"]
    assert torch.equal(torch.rand(3), expect_next)  # torch RNG restored to the saved point
    assert man["step"] == 1 and man["data"] == {"consumed_samples": 2} and man["extra"] == {"note": "x"}
    assert [id(t) for t in tree.leaves(p2)] == ids_before  # filled in place
    for (k, a), (_, b) in zip(tree.paths(params), tree.paths(p2)):
        assert torch.equal(a, b) and b.requires_grad == a.requires_grad, k
    pairs = [(k, a, b) for (k, a), (_, b) in zip(tree.paths(st), tree.paths(s2)) if isinstance(a, torch.Tensor)]
    assert len(pairs) > 10  # Adam moments of every leaf, counters, the plan's step count
    for k, a, b in pairs:
        assert torch.equal(a, b), k


def test_config_mismatch_names_fields_and_key_errors(tmp_path):
    model, params, step, st = _setup()
    ckpt.save(tmp_path, 3, params=params, opt_state=st, config=model.config.to_dict())
    other = model.config.replace(num_layers=3, rope_theta=500000.0)
    with pytest.raises(CheckpointError, match=r"num_layers: checkpoint=2 current=3.*rope_theta"):
        ckpt.load(tmp_path, params=params, config=other.to_dict())
    bad = dict(params)
    bad["extra_leaf"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"no pieces for parameter 'extra_leaf'"):
        ckpt.load(tmp_path, params=bad)
    wrong = tree.map(lambda t: t, params)
    wrong["final_norm"]["weight"] = torch.zeros(5)
    with pytest.raises(CheckpointError, match=r"final_norm.weight' has global shape \[64\] in the checkpoint, "
                                              r"the model expects \[5\]"):
        ckpt.load(tmp_path, params=wrong)
    sgd = pmodel.train.train_step(model, optim.sgd(0.1, momentum=0.9))
    with pytest.raises(CheckpointError, match=r"no optimizer state"):
        ckpt.load(tmp_path, params=params, opt_state=sgd.init(params))
    assert ckpt.load(tmp_path / "nowhere", params=params) is None  # nothing saved there yet


def test_save_killed_halfway_leaves_previous_checkpoint(tmp_path):
    model, params, step, st = _setup()
    ckpt.save(tmp_path, 1, params=params, opt_state=st, config=model.config.to_dict())
    before = {k: v.clone() for k, v in tree.paths(params)}
    script = textwrap.dedent(f"""
        import os, signal, torch, pmodel
        from pmodel import optim
        from pmodel.checkpoint import sharded as ckpt
        model = pmodel.families.preset("debug")
        params = pmodel.init(model, seed=7)
        step = pmodel.train.train_step(model, optim.adamw(1e-3), max_grad_norm=1.0)
        def die(path):
            if path.suffix == ".safetensors":   # the pieces written, their index and manifest not yet
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save({str(tmp_path)!r}, 2, params=params, opt_state=step.init(params),
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
    pa = load_file(a / "iter_0000020" / "rank_00000.safetensors")
    pb = load_file(b / "iter_0000020" / "rank_00000.safetensors")
    assert pa.keys() == pb.keys() and any(k.startswith("state/") for k in pa)
    for k in pa:  # params, optimizer state (moments, counters) and RNG states
        assert torch.equal(pa[k], pb[k]), k
    la, lb = _losses(a / "metrics.jsonl"), _losses(b / "metrics.jsonl")
    assert sorted(la) == sorted(lb) == list(range(1, 21))
    assert all(la[s] == lb[s] for s in la), [(s, la[s], lb[s]) for s in la if la[s] != lb[s]]


def test_corrupted_or_truncated_file_is_refused_naming_it(tmp_path):
    model, params, step, st = _setup()
    ckpt.save(tmp_path, 1, params=params, opt_state=st, config=model.config.to_dict())
    d = tmp_path / "iter_0000001"
    man = json.loads((d / "manifest.json").read_text())
    assert set(man["files"]) == {"rank_00000.json", "rank_00000.safetensors"}
    f = d / "rank_00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-20] ^= 0xFF  # one byte of tensor data: safetensors itself would read it without a word
    f.write_bytes(bytes(raw))
    _, p2, _, s2 = _setup(seed=5)
    with pytest.raises(CheckpointError, match=r"rank_00000.safetensors: corrupted"):
        ckpt.load(tmp_path, params=p2, opt_state=s2)
    with pytest.raises(CheckpointError, match=r"rank_00000.safetensors: corrupted"):
        ckpt.read_full(tmp_path)
    ckpt.load(tmp_path, params=p2, opt_state=s2, verify=False)  # the opt-out reads it anyway
    f.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated
    with pytest.raises(CheckpointError, match=r"rank_00000.safetensors: (cannot|corrupted)"):
        ckpt.load(tmp_path, params=p2, opt_state=s2, verify=False)


def test_paths_leaving_the_checkpoint_folder_are_refused(tmp_path):
    from pmodel.checkpoint.hf import read_safetensors_index
    model, params, step, st = _setup()
    root = tmp_path / "ck"
    ckpt.save(root, 1, params=params, opt_state=st, config=model.config.to_dict())
    outside = tmp_path / "elsewhere"
    ckpt.save(outside, 1, params=params, opt_state=st, config=model.config.to_dict())
    (root / "latest").write_text("../elsewhere/iter_0000001\n")
    with pytest.raises(CheckpointError, match=r"leaves the folder"):
        ckpt.load(root, params=params)
    (root / "latest").write_text("iter_0000001\n")
    mf = root / "iter_0000001" / "manifest.json"
    man = json.loads(mf.read_text())
    man["files"]["../../x.json"] = "0" * 64
    mf.write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=r"leaves the folder"):
        ckpt.load(root, params=params)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere/x.safetensors"}}))
    with pytest.raises(ValueError, match=r"leaves the folder"):
        read_safetensors_index(hf)


def test_manifest_or_index_missing_a_key_is_refused_naming_it(tmp_path):
    model, params, step, st = _setup()
    ckpt.save(tmp_path, 1, params=params, opt_state=st, config=model.config.to_dict())
    d = tmp_path / "iter_0000001"
    mf = d / "manifest.json"
    man = json.loads(mf.read_text())
    del man["step"]
    mf.write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match=r"manifest.json: missing key\(s\) \['step'\]"):
        ckpt.load(tmp_path, params=params, verify=False)
    man["step"] = 1
    mf.write_text(json.dumps(man))
    idx = d / "rank_00000.json"
    meta = json.loads(idx.read_text())
    del meta["pieces"][0]["kind"]
    idx.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"rank_00000.json: missing key 'kind'"):
        ckpt.load(tmp_path, params=params, verify=False)
    with pytest.raises(CheckpointError, match=r"rank_00000.json: corrupted"):
        ckpt.load(tmp_path, params=params)
