"""One step for every layout, one checkpoint format: scripts/pretrain.py and scripts/finetune.py
across tensor / pipeline / data parallel layouts (gloo, one thread per rank).

* TP2 x PP2 with the distributed optimizer on 4 ranks equals one process (1e-5 relative, every
  iteration); resuming it under the same layout is bitwise; resuming its checkpoint on one
  process, at PP4 and at TP2 x DP2 (the optimizer's ZeRO-1 shards resharded) continues with the
  uninterrupted single-process losses within 1e-5 relative.
* PP2 x DP2 with the replica (high-availability) distributed optimizer equals one process and
  resumes bitwise.
* LoRA fine-tuning under TP2 from finetune.py equals the single-process LoRA run (losses 1e-5
  relative, the saved adapter's tensors too).
* Multi-node launch as users run it: two ``torch.distributed.run`` agents (``--nnodes 2
  --rdzv-backend c10d`` on loopback, one process each) train TP2 and DP2 with the single-process
  losses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _dist import free_port

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "scripts" / "pretrain.py"
FINETUNE = ROOT / "scripts" / "finetune.py"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COMMON = ["--model", "debug", "--num-layers", "4", "--mock-data", "--seq-length", "32", "--micro-batch-size", "1",
          "--global-batch-size", "4", "--lr", "1e-3", "--log-interval", "1", "--no-progress"]
RTOL = 1e-5


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    env.update({"OMP_NUM_THREADS": "1", **kw})
    return env


def _ranks(script, args, nproc, timeout=240):
    """Start ``nproc`` ranks with the environment torchrun gives them; rank 0's stdout."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(nproc)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, (o, e)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} of {args} failed ({p.returncode}):\n{o[-3000:]}\n{e[-3000:]}"
    return outs[0][0]


def _single(script, args, timeout=240):
    p = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=_env(OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _metrics(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if '"loss"' in x and "eval_loss" not in x]


def _close(got, ref, what):
    assert [r["step"] for r in got] == [r["step"] for r in ref], what
    for g, r in zip(got, ref):
        assert abs(g["loss"] - r["loss"]) <= RTOL * abs(r["loss"]), (what, g, r)
        assert abs(g["grad_norm"] - r["grad_norm"]) <= RTOL * abs(r["grad_norm"]), (what, g, r)
        assert g["lr"] == pytest.approx(r["lr"], rel=1e-12), (what, g, r)


def _bitwise(got, ref, what):
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in got] == \
        [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in ref], what


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2xpp2_distributed_checkpoint_resumes_under_any_layout(tmp_path):
    ref_file = tmp_path / "ref.jsonl"
    _single(PRETRAIN, [*COMMON, "--train-iters", "6", "--metrics-file", ref_file])
    ref = _metrics(ref_file)
    ck = tmp_path / "ck"
    straight = tmp_path / "tp2pp2.jsonl"
    out = _ranks(PRETRAIN, [*COMMON, "--train-iters", "6", "--tensor-model-parallel-size", "2",
                            "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--save", ck,
                            "--save-interval", "3", "--metrics-file", straight], 4)
    assert "pp 2 x dp 1 x tp 2" in out, out
    _close(_metrics(straight), ref, "TP2xPP2 distributed optimizer vs one process")
    # Every piece records its global path, shape and slice; ZeRO-1 state pieces their flat range.
    pieces = [p for r in range(4) for p in json.loads((ck / "iter_0000003" / f"rank_{r:05d}.json").read_text())["pieces"]]
    q = [p for p in pieces if p["kind"] == "params" and p["param"] == "layers.0.attn.q_proj.weight"]
    assert sorted(tuple(map(tuple, p["slice"])) for p in q) == [((0, 32), (0, 64)), ((32, 64), (0, 64))]
    assert any(p["kind"] == "state" and p["flat"] is not None for p in pieces)

    resume = [*COMMON, "--train-iters", "6", "--load", ck, "--use-distributed-optimizer"]
    (ck / "latest").write_text("iter_0000003\n")
    same = tmp_path / "same.jsonl"
    out = _ranks(PRETRAIN, [*resume, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                            "--metrics-file", same], 4)
    assert "at iteration 3" in out and "resharded" not in out, out
    _bitwise(_metrics(same), _metrics(straight)[3:], "same-layout resume")

    one = tmp_path / "one.jsonl"
    out = _single(PRETRAIN, [*resume, "--metrics-file", one])
    assert "resharded" in out, out
    _close(_metrics(one), ref[3:], "resumed on one process")
    for name, flags in (("pp4", ["--pipeline-model-parallel-size", "4"]),
                        ("tp2dp2", ["--tensor-model-parallel-size", "2"])):
        m = tmp_path / f"{name}.jsonl"
        _ranks(PRETRAIN, [*resume, *flags, "--metrics-file", m], 4)
        _close(_metrics(m), ref[3:], f"resumed at {name}")


@pytest.mark.multiproc
@pytest.mark.slow
def test_pp2xdp2_replica_optimizer_equals_one_process_and_resumes_bitwise(tmp_path):
    """... and evaluates (--eval-interval: the pipeline's forward-only pass, summed over dp) as one
    process does."""
    ref_file = tmp_path / "ref.jsonl"
    ev = ["--eval-interval", "2", "--eval-iters", "2"]
    _single(PRETRAIN, [*COMMON, "--train-iters", "4", *ev, "--metrics-file", ref_file])
    ck, straight = tmp_path / "ck", tmp_path / "straight.jsonl"
    flags = ["--train-iters", "4", "--pipeline-model-parallel-size", "2", "--use-distributed-optimizer",
             "--enable-high-availability"]
    out = _ranks(PRETRAIN, [*COMMON, *flags, *ev, "--save", ck, "--save-interval", "2", "--metrics-file", straight], 4)
    assert "pp 2 x dp 2 x tp 1" in out, out
    _close(_metrics(straight), _metrics(ref_file), "PP2xDP2 replica vs one process")
    evals = [[json.loads(x) for x in Path(f).read_text().splitlines() if "eval_loss" in x] for f in (straight, ref_file)]
    assert [e["step"] for e in evals[0]] == [e["step"] for e in evals[1]] == [2, 4]
    for g, r in zip(*evals):
        assert g["eval_tokens"] == r["eval_tokens"] and abs(g["eval_loss"] - r["eval_loss"]) <= RTOL * r["eval_loss"]
    (ck / "latest").write_text("iter_0000002\n")
    again = tmp_path / "again.jsonl"
    _ranks(PRETRAIN, [*COMMON, *flags, "--load", ck, "--metrics-file", again], 4)
    _bitwise(_metrics(again), _metrics(straight)[2:], "PP2xDP2 replica resume")


def _need_stories():
    base = SHARED / "models" / "stories260K"
    sft = SHARED / "sft" / "llamafactory" / "alpaca_en_demo.json"
    if not (base / "model.safetensors").exists() or not sft.exists():
        pytest.skip("../shared/data (stories260K, sft/llamafactory) not present (fresh clone)")
    return base, sft


@pytest.mark.multiproc
@pytest.mark.slow
def test_lora_finetune_under_tp2_equals_one_process(tmp_path):
    from safetensors.torch import load_file
    base, sft = _need_stories()
    args = ["--load-hf", base, "--data-path", sft, "--prompt-type", "alpaca", "--seq-length", "256",
            "--max-samples", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
            "--lr", "0.5", "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "all",
            "--lora-dropout", "0.1", "--log-interval", "1", "--no-progress", "--clip-grad", "0.5",
            # Adam divides by sqrt(v): with eps 1e-8 a component's update is ~lr * sign(g) whatever
            # its size, so fp32 summation-order noise in the TP reductions (1e-7 of the gradient)
            # becomes visible in the factors. eps = 1 keeps the update ~lr * g (as the SGD
            # comparisons in tests/_parallel_checks.py do), so equal gradients give equal factors.
            "--adam-eps", "1"]
    _single(FINETUNE, [*args, "--save", tmp_path / "one", "--metrics-file", tmp_path / "one.jsonl"])
    out = _ranks(FINETUNE, [*args, "--save", tmp_path / "tp2", "--metrics-file", tmp_path / "tp2.jsonl",
                            "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2)
    assert '"saved"' in out, out
    _close(_metrics(tmp_path / "tp2.jsonl"), _metrics(tmp_path / "one.jsonl"), "LoRA TP2 vs one process")
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "tp2" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 5 * 7 * 2
    for k in a:  # the criterion of tests/_parallel_checks.py close(): 1e-5 of (|ref| + max |ref|)
        err, tol = (b[k] - a[k]).abs(), RTOL * (a[k].abs() + a[k].abs().max())
        assert bool((err <= tol).all()), (k, float(err.max()), float(a[k].abs().max()))
    assert json.loads((tmp_path / "tp2" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "one" / "adapter_config.json").read_text())


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_node_launch_with_c10d_rendezvous(tmp_path):
    """Two launcher agents, as on two machines (here both on loopback), one process each."""
    ref_file = tmp_path / "ref.jsonl"
    _single(PRETRAIN, [*COMMON, "--train-iters", "3", "--metrics-file", ref_file])
    for name, flags in (("tp2", ["--tensor-model-parallel-size", "2"]), ("dp2", [])):
        port, m = free_port(), tmp_path / f"{name}.jsonl"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"pmodel-{name}",
               str(PRETRAIN), *COMMON, "--train-iters", "3", "--metrics-file", str(m), *flags]
        agents = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for _ in range(2)]
        try:
            outs = [a.communicate(timeout=240) for a in agents]
        finally:
            for a in agents:
                if a.poll() is None:
                    a.kill()
        for a, (o, e) in zip(agents, outs):
            assert a.returncode == 0, f"{name} agent failed ({a.returncode}):\n{o[-3000:]}\n{e[-3000:]}"
        _close(_metrics(m), _metrics(ref_file), f"two nodes, {name}")
