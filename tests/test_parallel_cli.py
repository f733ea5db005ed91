"""scripts/pretrain.py's tensor / sequence / data parallel flags.

The multi-process test launches pretrain.py under ``torch.distributed.run`` (2 ranks, gloo, one
thread each) and checks the logged losses and gradient norms equal the single-process run's
(1e-5 relative): once with TP=2 + sequence parallel + the distributed optimizer (dp=1: it warns
that nothing is sharded), once with dp=2 + distributed optimizer + overlapped reduction + the
replica (high-availability) layout. The fast tests check that flags which cannot take effect
are refused with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _dist import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain.py"
COMMON = ["--model", "debug", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-3", "--log-interval", "1", "--no-progress"]


def _pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_cli_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd, timeout=120):
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _metrics(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.multiproc
@pytest.mark.slow
def test_pretrain_torchrun_matches_single_process(tmp_path):
    single = tmp_path / "single.jsonl"
    _run([sys.executable, str(SCRIPT), *COMMON, "--metrics-file", str(single)])
    ref = _metrics(single)
    assert [r["step"] for r in ref] == [1, 2, 3]
    runs = {
        "tp2 sp distopt": ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer"],
        "dp2 distopt overlap replica": ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                        "--enable-high-availability"],
    }
    for name, flags in runs.items():
        out = tmp_path / (name.replace(" ", "_") + ".jsonl")
        p = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                  "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(SCRIPT), *COMMON,
                  "--metrics-file", str(out), *flags])
        got = _metrics(out)  # rank 0 writes it; the loss is the global mean over all ranks
        assert [r["step"] for r in got] == [1, 2, 3], name
        # First step: same init (local shards cut from the same keyed draw), same data.
        assert _rel(got[0]["loss"], ref[0]["loss"]) < 1e-5, (name, got[0], ref[0])
        for g, r in zip(got, ref):  # later steps: the optimizer updates agree too
            assert _rel(g["loss"], r["loss"]) < 1e-5, (name, g, r)
            assert _rel(g["grad_norm"], r["grad_norm"]) < 1e-5, (name, g, r)
            assert g["lr"] == pytest.approx(r["lr"], rel=1e-12)
        if "tp2" in name:
            assert "nothing to shard" in p.stderr  # distributed optimizer on dp=1 says so


@pytest.mark.parametrize("flags, env, message", [
    (["--enable-high-availability"], {}, "needs --use-distributed-optimizer"),
    (["--tensor-model-parallel-size", "2"], {}, "launch with torchrun"),
    (["--tensor-model-parallel-size", "0"], {}, "must be >= 1"),
    (["--tensor-model-parallel-size", "3"], {"WORLD_SIZE": "3", "RANK": "0"}, "num_heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--tensor-model-parallel-size", "2"], {"WORLD_SIZE": "3", "RANK": "0"}, "does not divide the world size 3"),
])
def test_pretrain_parallel_flags_refused_with_reason(flags, env, message, monkeypatch):
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        _pretrain().main([*COMMON, *flags])
