"""Training as functions: :func:`train_step` and the :func:`train` loop.

``step = train_step(model, tx)`` returns a function ``step(params, opt_state, batch) ->
(params, opt_state, metrics)``. A batch is one micro-batch dict (``tokens``, ``labels``,
optional ``loss_mask`` / ``position_ids`` / ``attention_mask`` / ``cu_seqlens``) or a list of
them (gradient accumulation): the loss is the mean over *all* counted tokens of the global
batch, so accumulating k micro-batches equals one batch k times larger.

:func:`train` drives the step with a data source that is just ``consumed_samples -> iterator
of global batches`` (so resuming only needs the position), evaluates, logs, writes JSON-lines
metrics and saves checkpoints at intervals.

Throughput and MFU. Model FLOPs per token use the PaLM / Megatron estimate
``6 * N + 12 * L * H * Q * T`` where ``N`` is the parameter count without embeddings (token /
position embeddings and the output matrix), ``L`` layers, ``H`` heads, ``Q`` head dim and ``T``
the sequence length (the attention score and value matmuls, forward + backward). MFU is that
times tokens/s over the device's peak FLOP/s, which the caller states (``LoopConfig.peak_flops``);
without it MFU is not reported.
"""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from . import ops, optim, tree
from .autodiff import value_and_grad
from .checkpoint import state as ckpt
from .model import Model, ModelConfig
from .precision import Policy, last_step_skipped, loss_scale

__all__ = ["train_step", "train", "evaluate", "LoopConfig", "TrainState", "flops_per_token",
           "peak_memory_bytes", "count_tokens"]


def count_tokens(batch: dict) -> int:
    """Tokens that count towards the loss (label != -100 and loss_mask > 0)."""
    m = batch["labels"] != ops.IGNORE_INDEX
    if batch.get("loss_mask") is not None:
        m = m & (batch["loss_mask"] > 0)
    return int(m.sum())


def _micro_batches(batch) -> list[dict]:
    if isinstance(batch, dict):
        return [batch]
    mbs = list(batch)
    if not mbs or not all(isinstance(b, dict) for b in mbs):
        raise TypeError("a batch is a dict or a non-empty list of micro-batch dicts")
    return mbs


def train_step(model: Model, tx: optim.GradientTransformation, *, policy: Policy | None = None) -> Callable:
    """Build the training step function.

    Args:
      model: the model (``model.loss`` is the objective).
      tx: the optimizer; wrap it with :func:`pmodel.precision.mixed_precision` for bf16/fp16
        params or loss scaling.
      policy: the precision policy (default fp32); its ``param_dtype`` must equal the model's
        dtype; ``grad_accum_fp32`` accumulates micro-batch gradients in fp32.

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, metrics)``; params change in
      place (the same tensors are returned). ``metrics``: ``loss`` (mean over counted tokens),
      ``num_tokens`` (counted), ``tokens`` (processed), ``samples``, ``grad_norm`` (before
      clipping), ``lr``, ``loss_scale``, ``skipped``.
    """
    policy = policy or Policy()
    if model.config.dtype != policy.param_dtype:
        raise ValueError(f"train_step: the model computes in {model.config.dtype} but the precision policy says "
                         f"{policy.param_dtype}; build the model with dtype={policy.param_dtype}")

    def objective(params, mb, denom, scale):
        loss, aux = model.loss(params, mb, num_tokens=denom)
        return (loss * scale if scale != 1.0 else loss), aux

    vg = value_and_grad(objective, has_aux=True)

    def step(params, opt_state, batch):
        mbs = _micro_batches(batch)
        denom = max(sum(count_tokens(mb) for mb in mbs), 1)
        scale = loss_scale(opt_state)
        acc, loss_sum = None, 0.0
        for mb in mbs:
            (_, aux), g = vg(params, mb, denom, scale)
            loss_sum += float(aux["loss_sum"])
            if acc is None:
                acc = optim.tree_map(lambda x: x.float(), g) if policy.grad_accum_fp32 else g
            else:
                with torch.no_grad():
                    optim.tree_map(lambda a, x: a.add_(x.to(a.dtype)), acc, g)
            del g
        # The norm before the update: the optimizer reuses the gradient buffers (donation).
        gnorm = None if optim.find_states(opt_state, optim.ClipState) else float(optim.global_norm(acc)) / scale
        updates, opt_state = tx.update(acc, opt_state, params)
        del acc
        optim.apply_updates(params, updates)
        del updates
        skipped = last_step_skipped(opt_state)
        if skipped:
            gnorm = float("nan")
        elif gnorm is None:  # the clip transform measured it (on unscaled gradients)
            gnorm = float(optim.find_states(opt_state, optim.ClipState)[0].norm)
        metrics = {
            "loss": loss_sum / denom, "num_tokens": denom,
            "tokens": sum(int(mb["tokens"].numel()) for mb in mbs),
            "samples": sum(int(mb["tokens"].shape[0]) for mb in mbs),
            "grad_norm": gnorm, "lr": optim.current_lr(opt_state), "loss_scale": scale, "skipped": skipped,
        }
        return params, opt_state, metrics

    return step


@torch.no_grad()
def evaluate(model: Model, params, batches: Iterable, iters: int | None = None) -> dict:
    """Token-weighted mean loss over ``iters`` batches (all when None).

    Returns:
      ``{"loss", "ppl", "num_tokens", "batches"}``.
    """
    total, n, k = 0.0, 0, 0
    for batch in batches:
        if iters is not None and k >= iters:
            break
        for mb in _micro_batches(batch):
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


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: device allocator peak on CUDA, process peak RSS on CPU."""
    if device.type == "cuda":
        from .ops import cuda
        return cuda.peak_memory_bytes(device)
    try:
        # VmHWM is this address space's high-water mark; ru_maxrss (the fallback) is carried
        # across fork + exec on Linux, so a process started by a larger one would see its size.
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(kb) * (1 if sys.platform == "darwin" else 1024)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Loop settings (Megatron flag names in brackets).

    Attributes:
      train_iters: stop after this many optimizer steps in total (``--train-iters``).
      log_interval: log every N steps (``--log-interval``).
      eval_interval: evaluate every N steps (``--eval-interval``); None = never (an evaluation
        also runs at the end when ``eval_data`` is given).
      eval_iters: batches per evaluation (``--eval-iters``).
      save_interval: checkpoint every N steps (``--save-interval``); needs ``save_dir``.
      save_dir: checkpoint root (``--save``); a final checkpoint is written at the end.
      keep_last: keep only this many checkpoints (None = all).
      metrics_path: append one JSON object per log / eval event here.
      progress: show a tqdm progress bar.
      peak_flops: device peak FLOP/s for MFU; None = MFU not reported.
    """

    train_iters: int
    log_interval: int = 10
    eval_interval: int | None = None
    eval_iters: int = 10
    save_interval: int | None = None
    save_dir: str | None = None
    keep_last: int | None = None
    metrics_path: str | None = None
    progress: bool = True
    peak_flops: float | None = None

    def __post_init__(self):
        if self.train_iters < 0:
            raise ValueError(f"LoopConfig.train_iters must be >= 0, got {self.train_iters}")
        for name in ("log_interval", "eval_interval", "save_interval", "eval_iters"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"LoopConfig.{name} must be positive, got {v}")
        if self.save_interval is not None and self.save_dir is None:
            raise ValueError("LoopConfig.save_interval needs save_dir (--save)")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"LoopConfig.peak_flops must be positive, got {self.peak_flops}")


@dataclasses.dataclass
class TrainState:
    """Where training stands: optimizer steps done and samples consumed."""

    step: int = 0
    consumed_samples: int = 0


def train(model: Model, params, tx: optim.GradientTransformation, opt_state, train_data: Callable[[int], Iterator],
          *, loop: LoopConfig, policy: Policy | None = None, eval_data: Callable[[], Iterable] | None = None,
          state: TrainState | None = None, log: Callable[[str], None] | None = None,
          extra: dict | None = None) -> tuple[Any, Any, TrainState, list[dict]]:
    """Run the training loop from ``state`` until ``loop.train_iters``.

    Args:
      model, params, tx, opt_state: what :func:`train_step` works on.
      train_data: ``consumed_samples -> iterator of global batches`` (a dict or a list of
        micro-batch dicts each); called once, with the resume position.
      loop: intervals and outputs.
      policy: the precision policy.
      eval_data: ``() -> iterable of batches`` (a fresh pass each call), or None.
      state: resume position (default: step 0, 0 samples).
      log: line logger (default: print, or tqdm.write while the progress bar is shown).
      extra: JSON metadata stored in every checkpoint (e.g. the CLI arguments).

    Returns:
      ``(params, opt_state, state, history)``; ``history`` is the list of logged metric dicts.
    """
    state = dataclasses.replace(state) if state is not None else TrainState()
    step_fn = train_step(model, tx, policy=policy)
    first = next(x for x in tree.leaves(params) if isinstance(x, torch.Tensor))
    device = first.device
    metrics_file = None
    if loop.metrics_path:
        Path(loop.metrics_path).parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(loop.metrics_path, "a")
    bar = None
    if loop.progress and state.step < loop.train_iters:
        from tqdm.auto import tqdm
        bar = tqdm(total=loop.train_iters, initial=state.step, desc="train", unit="it", dynamic_ncols=True)
    say = log or (bar.write if bar is not None else print)
    history: list[dict] = []

    def emit(rec: dict):
        history.append(rec)
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()

    def save():
        path = ckpt.save(loop.save_dir, state.step, params=params, opt_state=opt_state,
                         config=model.config.to_dict(), data={"consumed_samples": state.consumed_samples},
                         extra=extra, keep_last=loop.keep_last)
        say(f"saved checkpoint {path}")

    def run_eval():
        ev = evaluate(model, params, eval_data(), loop.eval_iters)
        rec = {"step": state.step, "eval_loss": ev["loss"], "eval_ppl": ev["ppl"], "eval_tokens": ev["num_tokens"]}
        emit(rec)
        say(f"eval at iter {state.step} | loss {ev['loss']:.4f} | ppl {ev['ppl']:.2f} | tokens {ev['num_tokens']}")

    it = iter(train_data(state.consumed_samples))
    win = {"t0": time.perf_counter(), "tokens": 0, "steps": 0, "skipped": 0, "loss": 0.0, "n": 0}
    total_skipped = 0
    saved_at, ran = None, False
    try:
        while state.step < loop.train_iters:
            try:
                batch = next(it)
            except StopIteration:
                raise RuntimeError(f"training data ran out at iteration {state.step} "
                                   f"({state.consumed_samples} samples consumed)") from None
            params, opt_state, m = step_fn(params, opt_state, batch)
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
                say(f"iter {state.step}: inf/nan gradients, step skipped; loss scale now {loss_scale(opt_state):g}")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
            if state.step % loop.log_interval == 0 or state.step == loop.train_iters:
                if device.type == "cuda":
                    from .ops import cuda
                    cuda.synchronize(device)
                dt = time.perf_counter() - win["t0"]
                tps = win["tokens"] / dt if dt > 0 else float("nan")
                seq = int(batch["tokens"].shape[1] if isinstance(batch, dict) else batch[0]["tokens"].shape[1])
                mfu = flops_per_token(model.config, seq) * tps / loop.peak_flops if loop.peak_flops else None
                rec = {"step": state.step, "loss": win["loss"] / max(win["n"], 1), "lr": m["lr"],
                       "grad_norm": m["grad_norm"], "tokens_per_s": tps, "mfu": mfu,
                       "peak_mem_bytes": peak_memory_bytes(device), "loss_scale": m["loss_scale"],
                       "skipped": win["skipped"], "total_skipped": total_skipped,
                       "consumed_samples": state.consumed_samples, "time_per_iter_s": dt / max(win["steps"], 1)}
                emit(rec)
                line = (f"iter {state.step}/{loop.train_iters} | loss {rec['loss']:.4f} | lr {m['lr'] or 0:.3e} | "
                        f"grad norm {m['grad_norm']:.3f} | tokens/s {tps:,.0f} | "
                        + (f"mfu {mfu:.1%} | " if mfu is not None else "")
                        + f"peak mem {rec['peak_mem_bytes'] / 2**20:,.0f} MiB")
                if policy is not None and policy.loss_scale is not None:
                    line += f" | loss scale {m['loss_scale']:g} | skipped {win['skipped']}"
                say(line)
                win = {"t0": time.perf_counter(), "tokens": 0, "steps": 0, "skipped": 0, "loss": 0.0, "n": 0}
            if eval_data is not None and loop.eval_interval and state.step % loop.eval_interval == 0:
                run_eval()
            if loop.save_interval and state.step % loop.save_interval == 0:
                save()
                saved_at = state.step
        if eval_data is not None and (not loop.eval_interval or state.step % loop.eval_interval):
            run_eval()
        if loop.save_dir and ran and saved_at != state.step:
            save()
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    return params, opt_state, state, history
