"""Training as functions: :func:`train_step` and the one :func:`train` loop.

``step = train_step(model, tx)`` is the single-process step: the plan of
:func:`pmodel.parallel.parallelize` on a one-rank mesh, so one process and every parallel layout
run the same code. Its optimizer state is ``step.init(params)``. A step is
``step(params, opt_state, micro_batches) -> (params, opt_state, metrics)`` where
``micro_batches`` is one micro-batch dict (``tokens``, ``labels``, optional ``loss_mask`` /
``position_ids`` / ``attention_mask`` / ``cu_seqlens``) or a list of them (gradient
accumulation): the loss is the mean over *all* counted tokens of the global batch, so
accumulating k micro-batches equals one batch k times larger.

:func:`train` drives any step (single process or a parallel plan's) with a data source that is
just ``consumed_samples -> iterator of batches`` (so resuming only needs the position): it
logs, writes JSON-lines metrics, shows a progress bar, evaluates and saves checkpoints at
intervals. Under several processes every rank runs the loop; only the lead rank prints and
writes metrics.

Throughput and MFU. Model FLOPs per token use the PaLM / Megatron estimate
``6 * N + 12 * L * H * Q * T`` where ``N`` is the parameter count without embeddings (token /
position embeddings and the output matrix), ``L`` layers, ``H`` heads, ``Q`` head dim and ``T``
the sequence length (the attention score and value matmuls, forward + backward). MFU is that
times tokens/s over the devices' peak FLOP/s, which the caller states (``LoopConfig.peak_flops``,
per device; the loop multiplies by the world size); without it MFU is not reported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from . import device as devices
from . import optim, tree
from .model import Model, ModelConfig, count_tokens
from .precision import Policy

__all__ = ["train_step", "train", "evaluate", "LoopConfig", "TrainState", "flops_per_token", "count_tokens",
           "NonFiniteError"]


def train_step(model: Model, tx: optim.GradientTransformation, *, policy: Policy | None = None,
               max_grad_norm: float | None = None, micro_batch_hook: Callable | None = None) -> Callable:
    """The single-process training step.

    Args:
      model: the model (``model.loss`` is the objective).
      tx: the optimizer (elementwise; a global-norm clip goes to ``max_grad_norm``). fp32 main
        weights for bf16/fp16 params and fp16 loss scaling come from ``policy``.
      policy: the precision policy (default from the model's dtype); ``grad_accum_fp32``
        accumulates micro-batch gradients in fp32.
      max_grad_norm: global-norm gradient clipping (None = off).
      micro_batch_hook: ``(params, index or None) -> params`` applied per micro-batch (e.g. LoRA
        dropout keys; ``None`` = evaluation).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, metrics)``; params change in
      place (the same tensors are returned). ``step.init(params)`` is the optimizer state and
      ``step.plan`` the underlying :class:`~pmodel.parallel.ParallelPlan`. ``metrics``:
      ``loss`` (mean over counted tokens), ``num_tokens`` (counted), ``tokens`` (processed),
      ``samples``, ``grad_norm`` (before clipping), ``lr``, ``loss_scale``, ``skipped``.
    """
    from .parallel.mesh import Mesh
    from .parallel.plan import parallelize
    plan = parallelize(model, tx, Mesh.single(), policy=policy, max_grad_norm=max_grad_norm,
                       micro_batch_hook=micro_batch_hook)

    def step(params, opt_state, batch):
        return plan.step(params, opt_state, batch)

    step.init = plan.tx.init
    step.plan = plan
    return step


@torch.no_grad()
def evaluate(model: Model, params, batches: Iterable, iters: int | None = None) -> dict:
    """Token-weighted mean loss over ``iters`` batches (all when None), one process.

    Returns:
      ``{"loss", "ppl", "num_tokens", "batches"}``.
    """
    total, n, k = 0.0, 0, 0
    for batch in batches:
        if iters is not None and k >= iters:
            break
        for mb in ([batch] if isinstance(batch, dict) else list(batch)):
            _, aux = model.loss(params, mb)
            total += float(aux["loss_sum"])
            n += int(aux["num_tokens"])
        k += 1
    if n == 0:
        raise ValueError("evaluate: no counted tokens in the evaluation batches")
    loss = total / n
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "num_tokens": n, "batches": k}


def flops_per_token(cfg: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L H Q T`` (N without embeddings; see module doc)."""
    n = cfg.num_params(embeddings=False)
    return 6.0 * n + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_length


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Loop settings (Megatron flag names in brackets).

    Attributes:
      train_iters: stop after this many optimizer steps in total (``--train-iters``).
      log_interval: log every N steps (``--log-interval``).
      eval_interval: evaluate every N steps (``--eval-interval``); None = never (an evaluation
        also runs at the end when evaluation data is given).
      eval_iters: batches per evaluation (``--eval-iters``).
      save_interval: checkpoint every N steps (``--save-interval``); needs a save function.
      progress: show a tqdm progress bar (lead rank only).
      peak_flops: peak FLOP/s of one device, for MFU; None = MFU not reported.
      world_size: devices running the step (MFU divides by ``peak_flops * world_size``).
      metrics_path: append one JSON object per log / eval event here (lead rank only).
      max_nonfinite_steps: stop the run (:class:`NonFiniteError`) after this many consecutive
        steps whose loss or gradient norm was non-finite (their updates are skipped by the step;
        fp16 loss-scale overflows do not count); None = never stop. A checkpoint is never saved
        right after a non-finite step (so ``latest`` never moves to one).
    """

    train_iters: int
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 10
    save_interval: int | None = None
    progress: bool = True
    peak_flops: float | None = None
    world_size: int = 1
    metrics_path: str | None = None
    max_nonfinite_steps: int | None = 10

    def __post_init__(self):
        if self.train_iters < 0:
            raise ValueError(f"LoopConfig.train_iters must be >= 0, got {self.train_iters}")
        for name in ("log_interval", "eval_interval", "save_interval", "eval_iters", "world_size",
                     "max_nonfinite_steps"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"LoopConfig.{name} must be positive, got {v}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"LoopConfig.peak_flops must be positive, got {self.peak_flops}")


@dataclasses.dataclass
class TrainState:
    """Where training stands: optimizer steps done and samples consumed (global)."""

    step: int = 0
    consumed_samples: int = 0


def _first_tensor(params):
    return next(x for x in tree.leaves(params) if isinstance(x, torch.Tensor))


def _seq_len(batch) -> int:
    mb = batch if isinstance(batch, dict) else batch[0]
    return int(mb["tokens"].shape[1])


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm (the run diverged)."""


class _StopRequested(RuntimeError):
    """A termination signal arrived: stop at this step boundary (a failure checkpoint follows)."""


def _drop_records_after(path: Path, step: int) -> int:
    """Remove metric records of steps after ``step`` from a JSON-lines file; how many were dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            later = int(json.loads(line).get("step", 0)) > step
        except (ValueError, AttributeError, TypeError):
            later = False
        if later:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(path)
    return dropped


def train(step: Callable, params, opt_state, train_data: Callable[[int], Iterator], *, loop: LoopConfig,
          evaluate: Callable | None = None, eval_data: Callable[[], Iterable] | None = None,
          save: Callable | None = None, state: TrainState | None = None, config: ModelConfig | None = None,
          lead: bool = True, log: Callable[[str], None] | None = None,
          profiler=None, resilience=None) -> tuple[Any, Any, TrainState, list[dict]]:
    """Run the training loop from ``state`` until ``loop.train_iters``.

    Args:
      step: ``step(params, opt_state, batch) -> (params, opt_state, metrics)`` (:func:`train_step`
        or a parallel plan's ``plan.step``); metrics are global (equal on every rank).
      params, opt_state: what the step works on.
      train_data: ``consumed_samples -> iterator of batches`` (this rank's micro-batches of each
        global batch); called once, with the resume position.
      loop: intervals and outputs.
      evaluate: ``(params, batches, iters) -> {"loss", "ppl", "num_tokens", ...}`` (e.g.
        ``plan.evaluate``); needs ``eval_data``: ``() -> iterable of batches`` (a fresh pass).
      save: ``(state, params, opt_state) -> path`` writes a checkpoint (collective under several
        processes: every rank calls it); called every ``loop.save_interval`` steps and at the end.
      state: resume position (default: step 0, 0 samples).
      config: the model config, for MFU (with ``loop.peak_flops``).
      lead: this rank prints, shows the progress bar and writes metrics.
      log: line logger (default: print, or tqdm.write while the progress bar is shown).
      profiler: a :class:`pmodel.profiling.StepProfiler` (on the ranks that profile): it records
        its window of steps (numbered like Megatron's iteration: the steps done before it runs)
        and writes its trace when the window ends, or at the end of the loop.
      resilience: a :class:`pmodel.resilience.Resilience`: a local copy of each step's starting
        state, the integrity check after each step (a failed check restores the copy and redoes
        the step with the same batch; a ``{"event": "redo"}`` record says so), and the failure
        checkpoint (on an exception, or a stop request from a signal at a step boundary, the
        survivors write the last completed step, then :class:`~pmodel.resilience.TrainingInterrupted`
        is raised).

    When resuming (``state.step > 0``) the lead drops records of later steps from
    ``loop.metrics_path`` (they belong to steps rolled back by a failure), so the file holds each
    step once.

    Returns:
      ``(params, opt_state, state, history)``; ``history`` is the list of logged metric dicts.
    """
    if (evaluate is None) != (eval_data is None):
        raise ValueError("train: evaluate and eval_data go together (give both or neither)")
    if loop.save_interval is not None and save is None:
        raise ValueError("train: LoopConfig.save_interval needs a save function")
    if loop.peak_flops is not None and config is None:
        raise ValueError("train: LoopConfig.peak_flops (MFU) needs the model config")
    state = dataclasses.replace(state) if state is not None else TrainState()
    device = _first_tensor(params).device
    metrics_file = None
    if lead and loop.metrics_path:
        Path(loop.metrics_path).parent.mkdir(parents=True, exist_ok=True)
        dropped = _drop_records_after(Path(loop.metrics_path), state.step) if state.step > 0 else 0
        metrics_file = open(loop.metrics_path, "a")
    bar = None
    if lead and loop.progress and state.step < loop.train_iters:
        from tqdm.auto import tqdm
        bar = tqdm(total=loop.train_iters, initial=state.step, desc="train", unit="it", dynamic_ncols=True)
    printer = log or (bar.write if bar is not None else lambda s: print(s, flush=True))

    def say(line: str) -> None:
        if lead:
            printer(line)

    history: list[dict] = []
    if lead and loop.metrics_path and dropped:
        say(f"metrics: dropped {dropped} records of steps after {state.step} (rolled back) from {loop.metrics_path}")

    def emit(rec: dict):
        history.append(rec)
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

    def do_save():
        if bad_run:
            say(f"iter {state.step}: checkpoint not saved: the last {bad_run} step(s) were non-finite")
            return
        path = save(state, params, opt_state)
        if path is not None:
            say(f"saved checkpoint {path}")

    def run_eval():
        ev = evaluate(params, eval_data(), loop.eval_iters)
        emit({"step": state.step, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"], "eval_tokens": ev["num_tokens"]})
        say(f"eval at iter {state.step} | loss {ev['loss']:.4f} | ppl {ev['ppl']:.2f} | tokens {ev['num_tokens']}")

    def fresh_window():
        return {"t0": time.perf_counter(), "tokens": 0, "steps": 0, "skipped": 0, "loss": 0.0, "n": 0}

    it = iter(train_data(state.consumed_samples))
    win = fresh_window()
    total_skipped = 0
    bad_run = 0  # consecutive steps with a non-finite loss / gradient norm (updates skipped)
    saved_at, ran = None, False
    res = resilience
    in_step = False
    if res is not None:
        res.start()
    try:
        while state.step < loop.train_iters:
            if res is not None and res.stop_requested:
                raise _StopRequested(f"signal {res.signal} received")
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"training data ran out at iteration {state.step} "
                                   f"({state.consumed_samples} samples consumed)") from None
            k = state.step
            in_step = True
            if res is not None:
                res.begin(k, params, opt_state)
            if profiler is not None:
                profiler.begin(k)
            attempt = 0
            while True:
                if profiler is not None:
                    with profiler.annotate(k):
                        params, new_state, m = step(params, opt_state, batch)
                else:
                    params, new_state, m = step(params, opt_state, batch)
                problem = res.check(params, new_state, m) if res is not None else None
                if problem is None:
                    break
                attempt += 1
                if attempt > res.integrity.max_redo:
                    raise RuntimeError(f"iteration {k + 1}: integrity check failed again after {attempt - 1} "
                                       f"redo(s): {problem}; the fault repeats with the same batch (diverging "
                                       "data or model?)")
                params, opt_state = res.restore(params, opt_state)
                emit({"step": k + 1, "event": "redo", "problem": problem, "attempt": attempt})
                say(f"iter {k + 1}: integrity check failed: {problem}; restored the state before the step from the "
                    f"local copy and redoing it (redo {attempt})")
            if profiler is not None:
                profiler.end(k, device)
            opt_state = new_state
            in_step = False
            ran = True
            state.step += 1
            state.consumed_samples += m["samples"]
            win["tokens"] += m["tokens"]
            win["steps"] += 1
            win["loss"] += m["loss"] * m["num_tokens"]
            win["n"] += m["num_tokens"]
            if m["skipped"]:
                win["skipped"] += 1
                total_skipped += 1
                if m.get("nonfinite"):
                    bad_run += 1
                    say(f"iter {state.step}: non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}), "
                        f"update skipped ({bad_run} in a row)")
                else:
                    say(f"iter {state.step}: inf/nan gradients, step skipped (loss scale was {m['loss_scale']:g})")
            if not m.get("nonfinite"):
                bad_run = 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
            if state.step % loop.log_interval == 0 or state.step == loop.train_iters:
                devices.synchronize(device)
                dt = time.perf_counter() - win["t0"]
                tps = win["tokens"] / dt if dt > 0 else float("nan")
                mfu = (flops_per_token(config, _seq_len(batch)) * tps / (loop.peak_flops * loop.world_size)
                       if loop.peak_flops else None)
                rec = {"step": state.step, "loss": win["loss"] / max(win["n"], 1), "lr": m["lr"],
                       "grad_norm": m["grad_norm"], "tokens_per_s": tps, "mfu": mfu,
                       "peak_mem_bytes": devices.peak_memory_bytes(device), "loss_scale": m["loss_scale"],
                       "skipped": win["skipped"], "total_skipped": total_skipped,
                       "consumed_samples": state.consumed_samples, "time_per_iter_s": dt / max(win["steps"], 1)}
                rec.update({k: v for k, v in m.items() if k.startswith("moe_")})  # MoE router metrics, last step
                emit(rec)
                line = (f"iter {state.step}/{loop.train_iters} | loss {rec['loss']:.4f} | lr {m['lr'] or 0:.3e} | "
                        f"grad norm {m['grad_norm']:.3f} | tokens/s {tps:,.0f} | "
                        + (f"mfu {mfu:.1%} | " if mfu is not None else "")
                        + f"peak mem {rec['peak_mem_bytes'] / 2**20:,.0f} MiB")
                if m["loss_scale"] != 1.0 or total_skipped:
                    line += f" | loss scale {m['loss_scale']:g} | skipped {win['skipped']}"
                say(line)
                win = fresh_window()
            if loop.max_nonfinite_steps is not None and bad_run >= loop.max_nonfinite_steps:
                emit({"step": state.step, "event": "nonfinite_stop", "consecutive": bad_run})
                raise NonFiniteError(
                    f"iteration {state.step}: the loss or gradient norm was non-finite for {bad_run} consecutive "
                    f"steps (max_nonfinite_steps={loop.max_nonfinite_steps}); the run diverged (learning rate too "
                    "high? no gradient clipping?). Their updates were skipped; no checkpoint was written for them")
            if evaluate is not None and loop.eval_interval and state.step % loop.eval_interval == 0:
                run_eval()
            if loop.save_interval and state.step % loop.save_interval == 0:
                do_save()
                saved_at = state.step
        if evaluate is not None and (not loop.eval_interval or state.step % loop.eval_interval):
            run_eval()
        if save is not None and ran and saved_at != state.step:
            do_save()
    except (Exception, KeyboardInterrupt) as e:
        if res is None or res.failure is None:
            raise
        from .resilience import TrainingInterrupted
        reason = f"{type(e).__name__}: {e}"
        # Every rank logs its own failure (the lead may be the one that died).
        printer(f"rank {res.plan.mesh.global_rank}: failure at iteration {state.step + (1 if in_step else 0)} "
                f"({'inside' if in_step else 'between'} steps): {reason.splitlines()[0][:300]}")
        try:
            path, d = res.on_failure(state, params, opt_state, in_step=in_step, reason=reason, log=printer)
        except Exception as e2:  # noqa: BLE001 - report, then stop as intended
            printer(f"rank {res.plan.mesh.global_rank}: failure checkpoint not written: {type(e2).__name__}: {e2}")
            path, d = None, None
        if d is not None and d.get("step") is not None and res.plan.mesh.global_rank == d["lead"]:
            printer(f"failure checkpoint at iteration {d['step']} written by ranks {d['writers']} "
                    f"(dead or missing: {d['dead']}): {path}")
        raise TrainingInterrupted(f"training stopped at iteration {state.step}: {reason.splitlines()[0][:300]}",
                                  step=state.step, checkpoint=path) from e
    finally:
        if res is not None:
            res.close()
        if profiler is not None:
            profiler.close(device)
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return params, opt_state, state, history
