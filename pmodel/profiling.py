"""Profiling a window of training steps: ``torch.profiler`` on CPU / CUDA, ``torch_npu.profiler``
on Ascend NPUs.

:class:`StepProfiler` is handed to :func:`pmodel.train.train`, which calls :meth:`~StepProfiler.begin`
before and :meth:`~StepProfiler.end` after every step and runs the step inside
:meth:`~StepProfiler.annotate`. Steps are numbered like Megatron's ``iteration``: step ``k`` is the
one that runs when ``k`` steps are done (so the log line ``iter k+1`` reports it);
``ProfileConfig(step_start=3, step_end=5)`` records steps 3 and 4 (end exclusive), absolute
iteration numbers also after a resume. Every recorded step is a ``train_step <k>`` range in the
trace. Profiling only observes: a profiled step computes exactly what an unprofiled one does.

Levels (ModelLink's ``--profile-level``):

* ``level0``: the operator timeline: torch ops as the framework dispatches them and, on an
  accelerator, its kernels (torch_npu ``ProfilerLevel.Level0``, no AI Core metrics).
* ``level1``: level0 plus FLOP estimates of matmul-like ops (``with_flops``) and, on NPU,
  ``ProfilerLevel.Level1`` (AscendCL calls) with the AI Core pipeline-utilisation metrics.
* ``level2``: NPU only: ``ProfilerLevel.Level2`` (adds runtime and AI CPU data). torch.profiler
  has nothing beyond level1 on CPU / CUDA, so it is refused there.

Options: ``with_cpu`` adds the CPU-side ops to an accelerator's trace (on a CPU run they are the
trace, so it is refused there), ``with_stack`` Python stacks, ``with_memory`` tensor allocations,
``record_shapes`` operator input shapes.

Output per profiled rank: ``<save_path>/trace_rank<r>.json`` (Chrome trace; open in Perfetto or
chrome://tracing) and ``<save_path>/top_ops_rank<r>.txt`` (the table of the most expensive ops,
also printed). On NPU, ``torch_npu.profiler.tensorboard_trace_handler`` writes its Ascend folder
``<save_path>/rank<r>_*_ascend_pt`` (``ASCEND_PROFILER_OUTPUT/trace_view.json`` is the Chrome
trace; MindStudio Insight reads the folder); the table is printed and written as on CPU.

The library never imports torch_npu: on an NPU machine it has been imported (by the user or
torch's device-backend autoload), and the NPU profiler is found in ``sys.modules``; tests stand it
in the same way (``tests/npu_standins.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Callable

import torch

from . import device as devices

__all__ = ["LEVELS", "ProfileConfig", "StepProfiler", "profile_problems"]

LEVELS = ("level0", "level1", "level2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProfileConfig:
    """What to record (ModelLink flag names in brackets).

    Attributes:
      step_start: first recorded step (``--profile-step-start``; Megatron's 0-based iteration).
      step_end: first step not recorded (``--profile-step-end``, exclusive).
      level: ``level0`` / ``level1`` / ``level2`` (``--profile-level``; see the module doc).
      with_cpu: on an accelerator, also record CPU-side ops (``--profile-with-cpu``).
      with_stack: Python stacks (``--profile-with-stack``).
      with_memory: tensor allocations (``--profile-with-memory``).
      record_shapes: operator input shapes (``--profile-record-shapes``).
      save_path: output folder (``--profile-save-path``).
      top_ops: rows of the printed table.
    """

    step_start: int
    step_end: int
    level: str = "level0"
    with_cpu: bool = False
    with_stack: bool = False
    with_memory: bool = False
    record_shapes: bool = False
    save_path: str = "profile"
    top_ops: int = 20

    def __post_init__(self):
        if self.step_start < 0:
            raise ValueError(f"ProfileConfig.step_start must be >= 0, got {self.step_start}")
        if self.step_end <= self.step_start:
            raise ValueError(f"ProfileConfig.step_end ({self.step_end}) must be above step_start "
                             f"({self.step_start}): the window is [start, end)")
        if self.level not in LEVELS:
            raise ValueError(f"ProfileConfig.level must be one of {LEVELS}, got {self.level!r}")
        if self.top_ops < 1:
            raise ValueError(f"ProfileConfig.top_ops must be >= 1, got {self.top_ops}")


def profile_problems(cfg: ProfileConfig, device_type: str) -> list[str]:
    """Why ``cfg`` could not take effect on ``device_type`` (empty when it can)."""
    out = []
    if device_type == "cpu" and cfg.with_cpu:
        out.append("with_cpu adds the CPU-side ops to an accelerator's trace; on a cpu run they are the trace "
                   "already")
    if cfg.level == "level2" and device_type != "npu":
        out.append(f"level2 adds Ascend runtime and AI CPU data (torch_npu); torch.profiler on {device_type} has "
                   "level0 and level1")
    if device_type not in ("cpu", "cuda", "npu"):
        out.append(f"no profiler lowering for device type {device_type!r} (cpu, cuda, npu)")
    return out


class StepProfiler:
    """Records steps ``[cfg.step_start, cfg.step_end)`` of the loop on this rank.

    Args:
      cfg: the :class:`ProfileConfig`.
      rank: this process's global rank (names the output files).
      device_type: ``cpu``, ``cuda`` or ``npu`` (chooses the lowering).
      log: where the top-ops table goes (default: print).

    Raises:
      ValueError: with the reasons of :func:`profile_problems`.
      RuntimeError: ``npu`` without torch_npu imported.
    """

    def __init__(self, cfg: ProfileConfig, *, rank: int = 0, device_type: str = "cpu",
                 log: Callable[[str], None] | None = None):
        problems = profile_problems(cfg, device_type)
        if problems:
            raise ValueError("StepProfiler: " + "; ".join(problems))
        self.cfg, self.rank, self.device_type = cfg, rank, device_type
        self.log = log or (lambda s: print(s, flush=True))
        self._prof = None
        self.recorded: list[int] = []
        self.outputs: dict[str, str] = {}
        if device_type == "npu":
            mod = sys.modules.get("torch_npu")
            if mod is None or not hasattr(mod, "profiler"):
                raise RuntimeError("StepProfiler on npu needs torch_npu imported (import torch_npu before building "
                                   "the profiler)")
            self._npu = mod.profiler
        else:
            self._npu = None

    # ------------------------------------------------------------------ lowering
    def _make(self):
        c, out = self.cfg, Path(self.cfg.save_path)
        out.mkdir(parents=True, exist_ok=True)
        if self._npu is not None:
            P = self._npu
            acts = [P.ProfilerActivity.NPU] + ([P.ProfilerActivity.CPU] if c.with_cpu else [])
            level = {"level0": P.ProfilerLevel.Level0, "level1": P.ProfilerLevel.Level1,
                     "level2": P.ProfilerLevel.Level2}[c.level]
            metrics = P.AiCMetrics.AiCoreNone if c.level == "level0" else P.AiCMetrics.PipeUtilization
            exp = P._ExperimentalConfig(profiler_level=level, aic_metrics=metrics, data_simplification=False)
            return P.profile(activities=acts, record_shapes=c.record_shapes, profile_memory=c.with_memory,
                             with_stack=c.with_stack, with_flops=c.level != "level0", experimental_config=exp,
                             on_trace_ready=P.tensorboard_trace_handler(str(out), worker_name=f"rank{self.rank}"))
        A = torch.profiler.ProfilerActivity
        acts = [A.CPU] if self.device_type == "cpu" else [A.CUDA] + ([A.CPU] if c.with_cpu else [])
        return torch.profiler.profile(activities=acts, record_shapes=c.record_shapes, profile_memory=c.with_memory,
                                      with_stack=c.with_stack, with_flops=c.level != "level0")

    # ------------------------------------------------------------------ the loop's calls
    @property
    def active(self) -> bool:
        return self._prof is not None

    def begin(self, step: int) -> None:
        """Before step ``step`` (the number of steps done)."""
        if self._prof is None and self.cfg.step_start <= step < self.cfg.step_end:
            self._prof = self._make()
            self._prof.__enter__()

    def annotate(self, step: int):
        """The context the loop runs step ``step`` in (a named range while recording)."""
        if self._prof is None:
            return contextlib.nullcontext()
        self.recorded.append(step)
        return torch.profiler.record_function(f"train_step {step}")

    def end(self, step: int, device=None) -> None:
        """After step ``step``: stop and write the outputs once the window is over."""
        if self._prof is not None and step + 1 >= self.cfg.step_end:
            self.close(device)

    def close(self, device=None) -> None:
        """Stop recording (if recording) and write the trace and the table. The loop calls it
        at the end too, so a run shorter than the window still writes what it recorded."""
        if self._prof is None:
            return
        if device is not None:
            devices.synchronize(device)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        out = Path(self.cfg.save_path)
        if self._npu is None:
            trace = out / f"trace_rank{self.rank}.json"
            prof.export_chrome_trace(str(trace))
            self.outputs["trace"] = str(trace)
        else:
            self.outputs["trace"] = str(out)  # the handler wrote rank<r>_*_ascend_pt there
        sort = "self_cpu_time_total" if self.device_type == "cpu" else "self_device_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=self.cfg.top_ops)
        except (KeyError, AttributeError, RuntimeError):
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.cfg.top_ops)
        steps = f"{self.recorded[0]}..{self.recorded[-1]}" if self.recorded else "none"
        head = (f"[rank {self.rank}] profile of steps {steps} ({len(self.recorded)} step(s), {self.cfg.level}) -> "
                f"{self.outputs['trace']}")
        top = out / f"top_ops_rank{self.rank}.txt"
        top.write_text(head + "\n" + table + "\n")
        self.outputs["table"] = str(top)
        self.log(head + "\n" + table)
