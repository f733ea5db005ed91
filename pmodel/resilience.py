"""Resilience for the one training loop: a local copy of the step's starting state, a per-step
integrity check with a redo, and a failure checkpoint written by the surviving ranks.

:class:`Resilience` is what :func:`pmodel.train.train` takes (``resilience=``); the loop calls it
around every step:

* **Local copy** (:class:`LocalCopy`): before a step, this rank's params, optimizer state and RNG
  states are copied (into buffers allocated once; the params only where the integrity check may
  need them back). A step that failed or went wrong is undone by copying them back in place, so
  the same tensors (the ``.grad`` views of the data-parallel buckets) stay in use.
* **Integrity check** (:class:`IntegrityConfig`): after each step, a collective check that every
  rank agrees on: a non-finite global gradient norm (bf16 / fp32; with fp16 loss scaling that is
  an overflow, a skipped step, not a fault), non-finite parameters, and, when asked, a checksum of
  the replicated optimizer shards (the replica layout holds every shard on two data-parallel ranks,
  which compute the same bits). A failed check restores the local copy on every rank and redoes
  the step with the same batch (at most ``max_redo`` times, then it raises): the run continues
  exactly as if the fault had not happened.
* **Failure checkpoint** (:class:`FailureCheckpoint`): when a rank fails (an exception in the
  step, e.g. a collective that lost its peer; SIGTERM from the launcher; a peer that stops
  answering, which a collective reports after the process groups' timeout), the surviving ranks
  agree over a key-value store (the launcher's, which outlives any rank) on the newest step whose
  state they hold completely, roll back to it (the local copy undoes a step stopped in the middle
  of its optimizer update) and write one complete, atomic checkpoint of it from their pieces (with
  the replica optimizer every shard is held twice, so one data-parallel half suffices). The loop
  then raises :class:`TrainingInterrupted`; the launcher (``torch.distributed.run --max-restarts
  N``) restarts the job, which resumes from that checkpoint.

Nothing here reads the environment or installs anything by itself: the script passes the store,
the key prefix and the timeouts, and calls :meth:`Resilience.install_signal_handlers`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from . import tree

__all__ = ["IntegrityConfig", "LocalCopy", "FailureCheckpoint", "Resilience", "TrainingInterrupted",
           "state_checksum", "decide_failure_step"]


class TrainingInterrupted(RuntimeError):
    """The loop stopped on a failure (a lost peer, an exception, a termination signal).

    Attributes:
      step: the iteration the run stopped at (the last completed one on this rank).
      checkpoint: the failure checkpoint's folder, when this rank wrote part of one (None
        otherwise: another rank may still have written it; the manifest is the truth).
    """

    def __init__(self, msg: str, *, step: int, checkpoint: Path | None = None):
        super().__init__(msg)
        self.step, self.checkpoint = step, checkpoint


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntegrityConfig:
    """What the per-step integrity check looks at.

    Attributes:
      nonfinite: non-finite global gradient norm (unless the step was skipped for fp16 overflow)
        or non-finite parameters after the update.
      checksum: compare a checksum of the replica optimizer's shards (fp32 main weights, moments)
        between the two data-parallel ranks holding each shard (needs the replica layout).
      max_redo: redo a failed step at most this many times, then raise (a fault that repeats
        with the same batch is not transient: the data or the model diverges).
    """

    nonfinite: bool = True
    checksum: bool = False
    max_redo: int = 1

    def __post_init__(self):
        if self.max_redo < 1:
            raise ValueError(f"IntegrityConfig.max_redo must be >= 1, got {self.max_redo}")
        if not (self.nonfinite or self.checksum):
            raise ValueError("IntegrityConfig: nothing to check (nonfinite and checksum both off)")


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree.leaves(x, is_leaf=lambda v: v is None) if isinstance(t, torch.Tensor)]


class LocalCopy:
    """A copy of this rank's state at the start of a step (buffers allocated once).

    Args:
      params: also copy the params (the integrity check restores them; a failure inside a step
        never leaves them half-written: they change only after the step's last collective).
    """

    def __init__(self, *, params: bool = True):
        self.with_params = params
        self._p: list[torch.Tensor] | None = None
        self._s: list[torch.Tensor] | None = None
        self._rng = None
        self._rng_device = None
        self.step: int | None = None

    @staticmethod
    def _copy_into(bufs, src):
        if bufs is None or len(bufs) != len(src) or any(b.shape != s.shape or b.dtype != s.dtype
                                                         for b, s in zip(bufs, src)):
            return [s.detach().clone() for s in src]
        for b, s in zip(bufs, src):
            b.copy_(s.detach())
        return bufs

    @torch.no_grad()
    def take(self, step: int, params, opt_state) -> None:
        """Copy ``params`` (if enabled), ``opt_state`` and the RNG states, as of ``step`` steps done."""
        from .checkpoint.state import capture_rng
        if self.with_params:
            self._p = self._copy_into(self._p, _tensors(params))
        self._s = self._copy_into(self._s, _tensors(opt_state))
        dev = next((t.device for t in _tensors(params)), None)
        self._rng, self._rng_device = capture_rng(dev), dev
        self.step = step

    @torch.no_grad()
    def restore(self, params, opt_state, *, rng: bool = True):
        """Copy the state back into the same tensors (``opt_state`` must be the tree given to
        :meth:`take`: a step updates some of its leaves in place). Returns ``(params, opt_state)``."""
        from .checkpoint.state import restore_rng
        if self._s is None:
            raise RuntimeError("LocalCopy.restore before take")
        if self.with_params:
            for b, t in zip(self._p, _tensors(params)):
                t.copy_(b)
        cur = _tensors(opt_state)
        if len(cur) != len(self._s):
            raise RuntimeError("LocalCopy.restore: the optimizer state is not the tree the copy was taken of")
        for b, t in zip(self._s, cur):
            t.copy_(b)
        if rng and self._rng is not None:
            restore_rng(*self._rng, self._rng_device)
        return params, opt_state


def state_checksum(x) -> int:
    """An exact checksum of every tensor leaf of ``x``: the sum of the bit patterns (as integers,
    weighted by leaf position), so one flipped bit changes it; equal trees give equal sums."""
    total = torch.zeros((), dtype=torch.int64)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for i, t in enumerate(_tensors(x)):
        if t.numel() == 0:
            continue
        bits = t.detach().contiguous().reshape(-1)
        if t.dtype == torch.bool:
            bits = bits.to(torch.int64)
        elif t.is_floating_point() or t.dtype.itemsize in ints:
            bits = bits.view(ints[t.element_size()])
        total = total + (i + 1) * bits.to(torch.int64).sum().cpu()
    return int(total)


# ----------------------------------------------------------------------------- failure checkpoints
def decide_failure_step(announced: dict, dead: list, *, tp: int, pp: int, nshards: int) -> dict:
    """The newest step the surviving ranks hold completely, and who writes what.

    Args:
      announced: ``{rank: {"step", "ok", "tp", "pp", "shard"}}`` of the survivors (``ok``: its
        state at ``step`` is intact).
      dead: ranks that never announced.
      tp, pp: mesh sizes; nshards: optimizer shards per (tp, pp) coordinate (dp / 2 with the
        replica layout, dp with ZeRO-1, 1 without the distributed optimizer).

    Returns:
      ``{"step", "writers", "lead", "params", "shards", "dead", "announced"}``: ``params`` /
      ``shards`` are the ranks writing each (tp, pp) slice of the params and each optimizer shard
      once; or ``{"step": None, "reason": ...}`` when no step is held completely.
    """
    ok = {int(r): a for r, a in announced.items() if a["ok"]}
    for s in sorted({a["step"] for a in ok.values()}, reverse=True):
        at = sorted(r for r, a in ok.items() if a["step"] == s)
        pw, sw = {}, {}
        for r in at:
            a = ok[r]
            pw.setdefault((a["tp"], a["pp"]), r)
            sw.setdefault((a["tp"], a["pp"], a["shard"]), r)
        if len(pw) == tp * pp and len(sw) == tp * pp * nshards:
            return {"step": s, "writers": at, "lead": at[0], "params": sorted(pw.values()),
                    "shards": sorted(sw.values()), "dead": sorted(dead), "announced": sorted(map(int, announced))}
    held = {r: (a["step"], a["ok"]) for r, a in sorted(announced.items())}
    return {"step": None, "dead": sorted(dead), "announced": sorted(map(int, announced)),
            "reason": f"no step is held completely by the survivors (rank: (step, intact) = {held}; "
                      f"{tp} x {pp} param slices x {nshards} optimizer shards needed)"}


class FailureCheckpoint:
    """The survivors' checkpoint after a rank fails.

    Args:
      plan: the :class:`~pmodel.parallel.ParallelPlan` (mesh, optimizer layout, step phase).
      save: ``(state, params, opt_state, writer=Writer) -> path``: the run's checkpoint writer
        (e.g. ``plan.save_checkpoint`` into ``--save``) taking a
        :class:`~pmodel.checkpoint.sharded.Writer`.
      store: a ``torch.distributed.Store`` that outlives any rank (torchrun's agent store); None
        with one process.
      prefix: key prefix unique to this launch attempt (keys of an earlier attempt are ignored).
      peer_timeout_s: the process groups' collective timeout: a survivor blocked in a collective
        with a dead peer announces itself at most this long after the failure.
      heartbeat_s: a background thread bumps this rank's heartbeat counter this often.
      dead_after_s: a rank whose heartbeat has not moved for this long (and has not announced) is
        dead.
      local_copy: undo a step stopped during its optimizer update from the :class:`LocalCopy`
        (``--enable-optimizer-state-local-copy``); without it such a rank cannot contribute
        (its shards are half-updated) and the others must hold the step completely.
    """

    def __init__(self, plan, save: Callable, *, store=None, prefix: str = "pmodel-ha", peer_timeout_s: float,
                 heartbeat_s: float = 0.5, dead_after_s: float = 5.0, local_copy: bool = False):
        mesh = plan.mesh
        if mesh.world_size > 1 and store is None:
            raise ValueError("FailureCheckpoint: several ranks need a key-value store that outlives any rank")
        if peer_timeout_s <= 0 or heartbeat_s <= 0 or dead_after_s <= heartbeat_s:
            raise ValueError("FailureCheckpoint: timeouts must be positive and dead_after_s > heartbeat_s")
        self.plan, self.save, self.store, self.prefix = plan, save, store, prefix.rstrip("/")
        self.peer_timeout_s, self.heartbeat_s, self.dead_after_s = peer_timeout_s, heartbeat_s, dead_after_s
        self.local_copy = local_copy
        self.rank, self.world = mesh.global_rank, mesh.world_size
        self._stop = threading.Event()
        self._thread = None

    # -- heartbeat
    def start(self) -> None:
        if self.store is None or self._thread is not None:
            return
        key = f"{self.prefix}/hb/{self.rank}"

        def beat():
            while not self._stop.is_set():
                try:
                    self.store.add(key, 1)
                except Exception:  # the store went away (the launch is ending): stop beating
                    return
                self._stop.wait(self.heartbeat_s)
        self._thread = threading.Thread(target=beat, name="pmodel-heartbeat", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread = None

    # -- the protocol
    def _key(self, *parts) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _has(self, key: str) -> bool:
        return bool(self.store.check([key]))

    def decide(self, me: dict) -> dict:
        """Announce ``me`` and return the decision every survivor agrees on (the first one
        written to the store wins)."""
        zero, mesh = self.plan.zero, self.plan.mesh
        nshards = zero.nshards if zero is not None else 1
        if self.store is None:
            return decide_failure_step({self.rank: me}, [], tp=mesh.size("tp"), pp=mesh.size("pp"), nshards=nshards)
        s = self.store
        s.set(self._key("ann", self.rank), json.dumps(me))
        dkey = self._key("decision")
        start = time.monotonic()
        wait_s = self.peer_timeout_s + self.dead_after_s + 5.0
        beats, moved = {}, {}
        while True:
            if self._has(dkey):
                return json.loads(s.get(dkey))
            now = time.monotonic()
            ann = {r: json.loads(s.get(self._key("ann", r))) for r in range(self.world) if self._has(self._key("ann", r))}
            dead = []
            for r in range(self.world):
                if r in ann:
                    continue
                b = int(s.add(self._key("hb", r), 0))
                if beats.get(r) != b:
                    beats[r], moved[r] = b, now
                if now - moved[r] > self.dead_after_s:
                    dead.append(r)
            if len(ann) + len(dead) == self.world or now - start > wait_s:
                d = decide_failure_step(ann, [r for r in range(self.world) if r not in ann], tp=mesh.size("tp"),
                                        pp=mesh.size("pp"), nshards=nshards)
                return json.loads(s.compare_set(dkey, "", json.dumps(d)))
            time.sleep(0.05)

    def barrier(self, ranks: list, tag: str) -> Callable[[], None]:
        """A barrier over ``ranks`` through the store (the process group may be broken)."""
        count = [0]

        def wait():
            if self.store is None or len(ranks) == 1:
                return
            count[0] += 1
            key = self._key("barrier", tag, count[0])
            self.store.add(key, 1)
            deadline = time.monotonic() + self.peer_timeout_s + self.dead_after_s + 30.0
            while int(self.store.add(key, 0)) < len(ranks):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"failure checkpoint: barrier {tag}/{count[0]} over ranks {ranks} timed out")
                time.sleep(0.02)
        return wait

    def write(self, state, params, opt_state, *, in_step: bool, local: LocalCopy | None, reason: str,
              log: Callable[[str], None]) -> tuple[Path | None, dict]:
        """Roll back, agree on a step with the other survivors and write this rank's part.

        Returns ``(folder or None, decision)``."""
        from .checkpoint.sharded import Writer
        phase = self.plan.phase
        ok = True
        if in_step and phase == "update":
            if self.local_copy and local is not None and local.step == state.step:
                local.restore(params, opt_state)  # undo the half-done optimizer update
            else:
                ok = False
        elif in_step and local is not None and local.step == state.step:
            local.restore(params, opt_state)  # state untouched; RNG back to the step's start
        mesh, zero = self.plan.mesh, self.plan.zero
        me = {"rank": self.rank, "step": int(state.step), "ok": ok, "tp": mesh.rank("tp"), "pp": mesh.rank("pp"),
              "shard": zero.shard if zero is not None else 0, "phase": phase if in_step else "idle",
              "reason": reason[:300]}
        d = self.decide(me)
        if d["step"] is None:
            log(f"failure checkpoint: none written: {d['reason']}")
            return None, d
        if self.rank not in d["writers"]:
            return None, d
        writer = Writer(barrier=self.barrier(d["writers"], f"s{d['step']}"), lead=self.rank == d["lead"],
                        params=self.rank in d["params"], shards=self.rank in d["shards"])
        if int(state.step) != d["step"]:
            raise RuntimeError(f"failure checkpoint: rank {self.rank} holds step {state.step}, chosen {d['step']}")
        path = self.save(state, params, opt_state, writer=writer)
        return path, d


class Resilience:
    """What :func:`pmodel.train.train` calls around each step (see the module docstring).

    Args:
      plan: the :class:`~pmodel.parallel.ParallelPlan` the step belongs to (``step.plan`` of
        :func:`pmodel.train.train_step`).
      integrity: the per-step check and redo, or None.
      failure: the failure checkpoint, or None.
    """

    def __init__(self, plan, *, integrity: IntegrityConfig | None = None, failure: FailureCheckpoint | None = None):
        if integrity is not None and integrity.checksum and (plan.zero is None or not plan.zero.replica):
            raise ValueError("IntegrityConfig.checksum compares the replica optimizer's two copies of each shard: "
                             "it needs distributed_optimizer with high_availability (the replica layout)")
        if failure is not None and failure.plan is not plan:
            raise ValueError("Resilience: the failure checkpoint belongs to another plan")
        self.plan, self.integrity, self.failure = plan, integrity, failure
        need_copy = integrity is not None or (failure is not None and failure.local_copy)
        self.local = LocalCopy(params=integrity is not None) if need_copy else None
        self.signal: int | None = None
        self._old_handlers: dict = {}

    # -- signals (the script installs them; the library never does by itself)
    def install_signal_handlers(self, signals=(signal.SIGTERM,)) -> None:
        """Turn these signals into a stop request the loop honours at the next step boundary
        (a failure checkpoint follows). Main thread only."""
        def handler(signum, frame):
            self.signal = signum
        for s in signals:
            self._old_handlers[s] = signal.signal(s, handler)

    def close(self) -> None:
        for s, h in self._old_handlers.items():
            signal.signal(s, h)
        self._old_handlers = {}
        if self.failure is not None:
            self.failure.close()

    def start(self) -> None:
        if self.failure is not None:
            self.failure.start()

    @property
    def stop_requested(self) -> bool:
        return self.signal is not None

    # -- around a step
    def begin(self, step: int, params, opt_state) -> None:
        if self.local is not None:
            self.local.take(step, params, opt_state)

    def _world_sum(self, x: torch.Tensor) -> torch.Tensor:
        from .parallel import comm
        mesh = self.plan.mesh
        for d in ("tp", "cp", "ep", "dp", "pp"):
            if mesh.size(d) > 1:
                x = comm.all_reduce(x, mesh.group(d))
        return x

    @torch.no_grad()
    def check(self, params, opt_state, metrics: dict) -> str | None:
        """The integrity check after a step (collective; every rank gets the same answer)."""
        cfg = self.integrity
        if cfg is None:
            return None
        dev = next((t.device for t in _tensors(params)), torch.device("cpu"))
        flags = torch.zeros(2, dtype=torch.int64, device=dev)
        if cfg.nonfinite:
            bad = [t for t in _tensors(params) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            flags[0] = len(bad)
        if cfg.checksum:
            mesh = self.plan.mesh
            mine = torch.tensor([state_checksum(opt_state.inner)], dtype=torch.int64, device=dev)
            from .parallel import comm
            every = comm.all_gather(mine, mesh.group("dp"), 0)  # (dp,) in dp-rank order
            half = mesh.size("dp") // 2
            r = mesh.rank("dp")
            partner = (r + half) % (2 * half)
            flags[1] = int(every[r] != every[partner])
        flags = self._world_sum(flags)
        problems = []
        if cfg.nonfinite and ((metrics.get("nonfinite") or not metrics.get("skipped"))
                              and not math.isfinite(metrics["grad_norm"])):
            problems.append(f"non-finite gradient norm ({metrics['grad_norm']})")
        elif cfg.nonfinite and metrics.get("nonfinite"):
            problems.append(f"non-finite loss ({metrics.get('loss')})")
        if int(flags[0]):
            problems.append(f"non-finite parameters ({int(flags[0])} tensors over the ranks)")
        if int(flags[1]):
            problems.append(f"replica optimizer shards differ ({int(flags[1])} ranks' checksums)")
        return "; ".join(problems) or None

    def restore(self, params, opt_state):
        return self.local.restore(params, opt_state)

    # -- failures
    def on_failure(self, state, params, opt_state, *, in_step: bool, reason: str,
                   log: Callable[[str], None]) -> tuple[Path | None, dict | None]:
        """Write this rank's part of the failure checkpoint (see :class:`FailureCheckpoint`)."""
        if self.failure is None:
            return None, None
        return self.failure.write(state, params, opt_state, in_step=in_step, local=self.local, reason=reason, log=log)
