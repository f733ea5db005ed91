"""Profiling in the one loop (pmodel.profiling): the recorded window, the outputs, the levels'
options, the NPU lowering (torch_npu.profiler stood in on CPU) and the flags' refusals. A
profiled run trains exactly (bitwise) as an unprofiled one. The torchrun acceptance run (two
profiled ranks) is in tests/test_deterministic.py, sharing its launch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import pmodel
from pmodel import optim, tree
from pmodel.profiling import ProfileConfig, StepProfiler, profile_problems
from pmodel.train import LoopConfig, train, train_step

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "scripts" / "pretrain.py"


def _data(vocab):
    def data(start):
        i = start
        while True:
            g = torch.Generator().manual_seed(1000 + i)
            x = torch.randint(0, vocab, (2, 17), generator=g)
            yield {"tokens": x[:, :-1], "labels": x[:, 1:]}
            i += 2
    return data


def _run(profiler=None, iters=6):
    model = pmodel.families.preset("debug")
    params = pmodel.init(model, seed=0)
    step = train_step(model, optim.adamw(1e-3), max_grad_norm=1.0)
    params, _, _, hist = train(step, params, step.init(params), _data(model.config.vocab_size),
                               loop=LoopConfig(train_iters=iters, log_interval=1, progress=False),
                               profiler=profiler, log=lambda s: None)
    return params, hist


def trace_steps(path) -> list[int]:
    """The ``train_step <k>`` ranges of a Chrome trace."""
    ev = json.loads(Path(path).read_text())
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    return sorted(int(e["name"].split()[1]) for e in ev if str(e.get("name", "")).startswith("train_step "))


def test_profiled_steps_train_exactly_like_unprofiled_ones_and_trace_the_window(tmp_path):
    ref_params, ref = _run()
    prof = StepProfiler(ProfileConfig(step_start=3, step_end=5, level="level1", with_stack=True, with_memory=True,
                                      record_shapes=True, save_path=str(tmp_path)), rank=0, device_type="cpu",
                        log=lambda s: None)
    params, hist = _run(prof)
    key = lambda r: (r["step"], r["loss"], r["grad_norm"], r["lr"])  # noqa: E731
    assert [key(r) for r in hist] == [key(r) for r in ref]
    for (k, a), (_, b) in zip(tree.paths(params), tree.paths(ref_params)):
        assert torch.equal(a, b), k
    assert prof.recorded == [3, 4] and not prof.active
    assert trace_steps(tmp_path / "trace_rank0.json") == [3, 4]
    ev = json.loads((tmp_path / "trace_rank0.json").read_text())["traceEvents"]
    mm = [e for e in ev if e.get("name") == "aten::mm"]
    assert mm and all("Input Dims" in e["args"] for e in mm)  # record_shapes
    assert any(e.get("name") == "[memory]" for e in ev)  # with_memory
    table = (tmp_path / "top_ops_rank0.txt").read_text()
    assert "profile of steps 3..4 (2 step(s), level1)" in table and "aten::mm" in table
    assert "FLOPs" in table  # level1: FLOP estimates of the matmuls


def test_level0_has_no_flops_and_a_short_run_writes_what_it_recorded(tmp_path):
    prof = StepProfiler(ProfileConfig(step_start=1, step_end=9, save_path=str(tmp_path)), log=lambda s: None)
    _run(prof, iters=3)  # the loop ends inside the window: close() at the end writes it
    assert trace_steps(tmp_path / "trace_rank0.json") == [1, 2]
    assert "FLOPs" not in (tmp_path / "top_ops_rank0.txt").read_text()


def test_options_that_cannot_take_effect_are_refused():
    assert profile_problems(ProfileConfig(step_start=0, step_end=1, with_cpu=True), "cpu")
    assert profile_problems(ProfileConfig(step_start=0, step_end=1, level="level2"), "cuda")
    assert not profile_problems(ProfileConfig(step_start=0, step_end=1, level="level2", with_cpu=True), "npu")
    with pytest.raises(ValueError, match="step_end"):
        ProfileConfig(step_start=3, step_end=3)
    with pytest.raises(ValueError, match="level"):
        ProfileConfig(step_start=0, step_end=1, level="level3")
    with pytest.raises(RuntimeError, match="torch_npu"):
        StepProfiler(ProfileConfig(step_start=0, step_end=1), device_type="npu")


class _NpuProfilerStandIn:
    """``torch_npu.profiler`` with its documented API (profile, ProfilerActivity, ProfilerLevel,
    AiCMetrics, _ExperimentalConfig, tensorboard_trace_handler), recording what it was asked and
    running torch.profiler on CPU underneath; its trace handler writes the Chrome trace into the
    Ascend-style folder ``<dir>/<worker>_<n>_ascend_pt/ASCEND_PROFILER_OUTPUT/trace_view.json``."""

    def __init__(self):
        self.calls = []
        self.ProfilerActivity = types.SimpleNamespace(CPU="CPU", NPU="NPU")
        self.ProfilerLevel = types.SimpleNamespace(Level0="Level0", Level1="Level1", Level2="Level2")
        self.AiCMetrics = types.SimpleNamespace(AiCoreNone="AiCoreNone", PipeUtilization="PipeUtilization")

    def _ExperimentalConfig(self, **kw):
        return dict(kw)

    def tensorboard_trace_handler(self, dir_name, worker_name=None):
        def handler(prof):
            out = Path(dir_name) / f"{worker_name}_1_ascend_pt" / "ASCEND_PROFILER_OUTPUT"
            out.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(out / "trace_view.json"))
        return handler

    def profile(self, *, activities, on_trace_ready, experimental_config, **kw):
        self.calls.append({"activities": activities, "experimental_config": experimental_config, **kw})
        stand_in = self

        class Prof(torch.profiler.profile):
            def __exit__(self, *exc):
                out = super().__exit__(*exc)
                on_trace_ready(self)
                return out
        del stand_in
        return Prof(activities=[torch.profiler.ProfilerActivity.CPU], **kw)


def test_npu_lowering_goes_to_torch_npu_profiler(tmp_path, monkeypatch):
    if "torch_npu" in sys.modules and not isinstance(sys.modules["torch_npu"], types.SimpleNamespace):
        pytest.skip("the real torch_npu is imported")
    standin = _NpuProfilerStandIn()
    monkeypatch.setitem(sys.modules, "torch_npu", types.SimpleNamespace(profiler=standin))
    for level, aic in (("level0", "AiCoreNone"), ("level1", "PipeUtilization"), ("level2", "PipeUtilization")):
        cfg = ProfileConfig(step_start=0, step_end=2, level=level, with_cpu=level == "level2",
                            record_shapes=True, save_path=str(tmp_path / level))
        prof = StepProfiler(cfg, rank=3, device_type="npu", log=lambda s: None)
        for k in range(3):
            prof.begin(k)
            with prof.annotate(k):
                torch.ones(4, 4) @ torch.ones(4, 4)
            prof.end(k)
        call = standin.calls[-1]
        assert call["activities"] == (["NPU", "CPU"] if level == "level2" else ["NPU"])
        assert call["experimental_config"] == {"profiler_level": level.replace("l", "L", 1), "aic_metrics": aic,
                                               "data_simplification": False}
        assert call["record_shapes"] is True and call["with_flops"] == (level != "level0")
        trace = tmp_path / level / "rank3_1_ascend_pt" / "ASCEND_PROFILER_OUTPUT" / "trace_view.json"
        assert trace_steps(trace) == [0, 1]
        assert (tmp_path / level / "top_ops_rank3.txt").exists()


def _cli(*args):
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(PRETRAIN), "--model", "debug", "--mock-data", "--seq-length", "16",
                           "--micro-batch-size", "2", "--lr", "1e-3", "--no-progress", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_profile_flags_take_effect_or_are_refused(tmp_path):
    p = _cli("--train-iters", "4", "--profile", "--profile-step-start", "1", "--profile-step-end", "3",
             "--profile-save-path", tmp_path / "p", "--log-interval", "1")
    assert p.returncode == 0, p.stderr
    assert trace_steps(tmp_path / "p" / "trace_rank0.json") == [1, 2]
    assert "profile of steps 1..2" in p.stdout
    for args, words in ((["--profile-level", "level1"], "--profile-level configure --profile"),
                        (["--profile", "--profile-step-end", "9"], "--profile-step-end 9"),
                        (["--profile", "--profile-ranks", "1"], "--profile-ranks 1"),
                        (["--profile", "--profile-with-cpu"], "--profile-with-cpu"),
                        (["--profile", "--profile-level", "level2"], "--profile-level level2"),
                        (["--profile", "--profile-step-start", "3", "--profile-step-end", "2"], "--profile-step-end")):
        p = _cli("--train-iters", "4", *args)
        assert p.returncode != 0 and words in p.stderr, (args, p.stderr)
