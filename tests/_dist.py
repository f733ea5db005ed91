"""Launch N gloo ranks in fresh processes and collect their results (a reusable test helper).

Usage from a test::

    from _dist import launch

    def _worker(rank, world, some_arg):       # module level, so spawn can import it
        ...                                   # torch.distributed is initialised (gloo)
        return {"check name": None or "failure message", ...}

    def test_it():
        results = launch(_worker, 2, some_arg)   # one return value per rank
        assert_all_ok(results)

A worker that raises sends its traceback back; :func:`launch` then raises ``AssertionError``
naming the rank, so pytest shows the real failure instead of a hang. Every rank runs with one
intra-op thread (the CI machine has two cores shared by everything).
"""
from __future__ import annotations

import os
import queue as _queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

__all__ = ["launch", "assert_all_ok", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, q, args, backend):
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        q.put((rank, "ok", out))
    except BaseException:  # report everything, including assertion errors, to the parent
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def launch(fn: Callable, world_size: int, *args: Any, timeout_s: float = 300.0, backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks.

    Args:
      fn: a module-level function (spawn pickles it by reference).
      world_size: number of ranks.
      args: extra picklable arguments.
      timeout_s: fail (and kill the ranks) if they have not all reported by then.
      backend: torch.distributed backend (gloo for CPU tests).

    Returns:
      the per-rank return values, indexed by rank.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the children at spawn
    try:
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, q, args, backend), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and not errors:
                    errors.append(f"rank process exited with code {dead[0].exitcode} without reporting")
                if errors:
                    # One rank failed: the others are likely blocked in a collective; give them a moment.
                    deadline = min(deadline, time.monotonic() + 5.0)
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank} raised:\n{payload}")
                deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    if len(results) != world_size:
        missing = sorted(set(range(world_size)) - set(results))
        raise AssertionError(f"ranks {missing} did not report within {timeout_s}s")
    return [results[r] for r in range(world_size)]


def assert_all_ok(results: list) -> None:
    """Each rank returns ``{check: None or failure message}``; fail listing every failed check."""
    bad = [f"rank {r} {name}: {msg}" for r, res in enumerate(results) for name, msg in res.items() if msg]
    checks = sum(len(res) for res in results)
    assert checks > 0, "workers ran no checks"
    assert not bad, f"{len(bad)} of {checks} checks failed:\n" + "\n".join(bad)
