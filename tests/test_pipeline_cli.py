"""scripts/pretrain.py's pipeline-parallel flags and multi-process checkpoints.

The multi-process test launches pretrain.py under ``torch.distributed.run`` (2 ranks, gloo, one
thread each) with ``--pipeline-model-parallel-size 2`` and the 1F1B (+ distributed optimizer) and
zero-bubble (+ uneven split, recompute) schedules, and checks the logged per-iteration losses and
gradient norms equal the single-process run's (1e-5 relative; the lr exactly); the interleaved
schedule runs in bf16 against single-process bf16 (step 1 at fp32 tolerances, later steps at bf16
resolution, see the comment there). It then checks resume: the 1F1B run saves after
iterations 2 and 4; a new launch with ``--load`` from iteration 2 repeats iterations 3 and 4 with
bitwise-equal losses and gradient norms (CPU fp32, same ops in the same order). Only the 1F1B
run goes through torchrun itself; the others start the ranks with the environment torchrun
gives them, which saves the launcher's start-up. The fast tests
check that combinations which cannot take effect are refused with the reason, before any
process group exists.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _dist import free_port
from test_parallel_cli import ROOT, SCRIPT, _env, _metrics, _pretrain, _rel, _run

# 4 layers so that 2 stages x 2 virtual chunks fit; 4 micro-batches of 1 per step (the pipeline's M).
COMMON = ["--model", "debug", "--num-layers", "4", "--mock-data", "--seq-length", "32", "--micro-batch-size", "1",
          "--global-batch-size", "4", "--train-iters", "4", "--lr", "1e-3", "--log-interval", "1", "--no-progress"]


def _launch(flags, out, nproc=2, torchrun=False):
    """Run pretrain.py on ``nproc`` ranks; returns rank 0's ``(stdout, stderr)``.

    ``torchrun=True`` goes through ``python -m torch.distributed.run``; otherwise the ranks are
    started directly with the environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), which saves the launcher process's start-up on the 2-core CI box.
    """
    cmd = [str(SCRIPT), *COMMON, "--metrics-file", str(out), *flags]
    port = str(free_port())
    if torchrun:
        p = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                  "--master-addr", "127.0.0.1", "--master-port", port, *cmd])
        return p.stdout, p.stderr
    procs = []
    for r in range(nproc):
        env = {**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    res = []
    try:
        res = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, (o, e)) in enumerate(zip(procs, res)):
        assert p.returncode == 0, f"rank {r} of {cmd} failed ({p.returncode}):\n{o[-3000:]}\n{e[-3000:]}"
    return res[0]


def _single(argv):
    """The single-process reference, in this process (no second start-up) with one thread like each
    rank: on the shared 2-core box a multi-threaded run of these tiny matmuls mostly waits on spinning
    threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _pretrain().main(argv) == 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.multiproc
@pytest.mark.slow
def test_pretrain_pipeline_matches_single_process_and_resumes(tmp_path):
    single = tmp_path / "single.jsonl"
    _single([*COMMON, "--metrics-file", str(single)])
    ref = _metrics(single)
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    runs = {
        "pp2 1f1b distopt": ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer"],
        "pp2 zero-bubble uneven 1,3 recompute": ["--pipeline-model-parallel-size", "2", "--pipeline-schedule",
                                                 "zero-bubble", "--num-layer-list", "1,3",
                                                 "--recompute-granularity", "full", "--recompute-method", "uniform",
                                                 "--recompute-num-layers", "1"],
    }
    ck = tmp_path / "ckpt"
    got_all = {}
    for name, flags in runs.items():
        out = tmp_path / (name.replace(" ", "_") + ".jsonl")
        straight = name == "pp2 1f1b distopt"  # also saves at iterations 2 and 4, for the resume below
        stdout, _ = _launch([*flags, *(["--save", str(ck), "--save-interval", "2"] if straight else [])], out,
                            torchrun=straight)
        got = got_all[name] = _metrics(out)  # rank 0 writes it: the last stage's loss, broadcast
        assert [r["step"] for r in got] == [1, 2, 3, 4], name
        for g, r in zip(got, ref):
            assert _rel(g["loss"], r["loss"]) < 1e-5, (name, g, r)
            assert _rel(g["grad_norm"], r["grad_norm"]) < 1e-5, (name, g, r)
            assert g["lr"] == pytest.approx(r["lr"], rel=1e-12)
        assert "pipeline" in stdout and "pp 2" in stdout, stdout

    # bf16 (fp32 main weights in the optimizer) with the interleaved schedule vs single-process bf16.
    single16 = tmp_path / "single_bf16.jsonl"
    _single([*COMMON, "--bf16", "--metrics-file", str(single16)])
    ref16 = _metrics(single16)
    out = tmp_path / "interleaved_bf16.jsonl"
    _launch(["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--bf16"], out)
    got = _metrics(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # Step 1 runs the same bf16 ops on the same bf16 weights: the fp32 tolerances hold.
    assert _rel(got[0]["loss"], ref16[0]["loss"]) < 1e-6 and _rel(got[0]["grad_norm"], ref16[0]["grad_norm"]) < 1e-5
    # Later steps: the clip coefficient comes from a float64 norm here and a float32 one in the
    # single-process clip (1e-7 apart), which moves the fp32 main weights by ~1e-7 relative; where
    # that flips a bf16 rounding of a parameter the difference is one bf16 ulp (2**-8 relative), so
    # the steps are compared at bf16 resolution (measured: <= 3e-6 loss, 4.3e-5 grad norm).
    for g, r in zip(got, ref16):
        assert _rel(g["loss"], r["loss"]) < 2 ** -8 and _rel(g["grad_norm"], r["grad_norm"]) < 2 ** -8, (g, r)
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12)

    # Resume: the straight run saved after iterations 2 and 4; point `latest` back at iteration 2
    # and resume in a new launch: iterations 3 and 4 must repeat the straight run bitwise.
    assert (ck / "latest").read_text().strip() == "iter_0000004"
    man = json.loads((ck / "iter_0000002" / "manifest.json").read_text())
    assert man["mesh"]["pp"] == 2 and man["data"]["consumed_samples"] == 8
    assert sorted(p.name for p in (ck / "iter_0000002").glob("rank_*.json")) == ["rank_00000.json", "rank_00001.json"]
    (ck / "latest").write_text("iter_0000002\n")
    second = tmp_path / "second.jsonl"
    stdout, _ = _launch([*runs["pp2 1f1b distopt"], "--load", str(ck)], second)
    assert "resumed from" in stdout and "at iteration 2" in stdout, stdout
    resumed = _metrics(second)
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(resumed, got_all["pp2 1f1b distopt"][2:]):  # CPU fp32, same ops in the same order
        assert (a["loss"], a["grad_norm"], a["lr"]) == (b["loss"], b["grad_norm"], b["lr"]), (a, b)


@pytest.mark.parametrize("flags, env, message", [
    (["--pipeline-model-parallel-size", "2"], {}, "launch with torchrun"),
    (["--pipeline-model-parallel-size", "0"], {}, "must be >= 1"),
    (["--num-layer-list", "2,2"], {}, "--num-layer-list needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layer-list", "1,1,2"], {"WORLD_SIZE": "2", "RANK": "0"},
     "has 3 entries; expected one per pipeline stage"),
    (["--pipeline-model-parallel-size", "2", "--num-layer-list", "1,2"], {"WORLD_SIZE": "2", "RANK": "0"},
     "sums to 3; the model has 4 layers"),
    (["--pipeline-model-parallel-size", "2", "--num-layer-list", "0,4"], {"WORLD_SIZE": "2", "RANK": "0"},
     "has a stage with no layers"),
    (["--pipeline-model-parallel-size", "2", "--num-layer-list", "1,x"], {"WORLD_SIZE": "2", "RANK": "0"},
     "expected comma-separated integers"),
    (["--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2"], {"WORLD_SIZE": "2", "RANK": "0"},
     "= 4 does not divide the world size 2"),
    (["--pipeline-model-parallel-size", "2"], {"WORLD_SIZE": "3", "RANK": "0"}, "does not divide the world size 3"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "interleaved"], {"WORLD_SIZE": "2", "RANK": "0"},
     "needs --num-layers-per-virtual-pipeline-stage"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "zero-bubble",
      "--num-layers-per-virtual-pipeline-stage", "1"], {"WORLD_SIZE": "2", "RANK": "0"}, "would ignore them"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"],
     {"WORLD_SIZE": "2", "RANK": "0"}, "needs at least 2 chunks per stage"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "3"], {"WORLD_SIZE": "2", "RANK": "0"}, "to be a multiple of --pipeline-model-parallel"),
    (["--pipeline-model-parallel-size", "2", "--num-layer-list", "1,3", "--num-layers-per-virtual-pipeline-stage",
      "1"], {"WORLD_SIZE": "2", "RANK": "0"}, "give one of them"),
    (["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--overlap-grad-reduce"],
     {"WORLD_SIZE": "4", "RANK": "0"}, "runs with pipeline size 1 only"),
    (["--pipeline-model-parallel-size", "2", "--hf-config", "TIED", "--tensor-model-parallel-size", "2"],
     {"WORLD_SIZE": "4", "RANK": "0"}, "tied embeddings with tensor parallel"),
])
def test_pipeline_flags_refused_with_reason(flags, env, message, monkeypatch, tmp_path):
    import re
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = [*COMMON, *flags]
    if "TIED" in argv:  # a tied-embedding architecture from an HF config (no --model with it)
        cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
               "intermediate_size": 172, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True}
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        argv = [a for a in argv if a not in ("--model", "debug")]
        argv[argv.index("TIED")] = str(tmp_path)
    with pytest.raises(SystemExit, match=re.escape(message)):
        _pretrain().main(argv)
