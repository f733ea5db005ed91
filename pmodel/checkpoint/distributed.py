"""Sharded checkpoints of multi-process runs (tensor / pipeline / data parallel).

Layout: ``root/iter_NNNNNNN/manifest.json`` (format, step, layout, config) and one
:func:`pmodel.checkpoint.state.save` checkpoint per global rank in ``rank_RRRRR/`` (that rank's
params: its TP shards / stage layers by global path; its optimizer state, including its
distributed-optimizer shard; its RNG states; the data position). Ranks write into a hidden temp
folder; after a barrier rank 0 writes the manifest, renames the folder into place and only then
moves ``root/latest``, so a crash mid-save leaves the previous checkpoint loadable.

Both functions are collective: every rank of the default process group calls them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import state as ckpt
from .state import CheckpointError, _fsync_path

__all__ = ["FORMAT", "save_sharded", "load_sharded"]

FORMAT = "pmodel-parallel-checkpoint"


def save_sharded(root, step: int, consumed: int, params, opt_state, *, rank: int, layout: dict, config: dict,
                 extra: dict) -> Path:
    """Save this rank's shard of a multi-process checkpoint (collective).

    Args:
      root: checkpoint root folder.
      step, consumed: iteration and consumed samples.
      params, opt_state: this rank's params and optimizer state.
      rank: global rank.
      layout: what the shards depend on (world size, tp, pp, dp, stages, optimizer layout);
        a resume must match it.
      config: the model config dict.
      extra: free-form JSON stored with each rank's checkpoint.

    Returns:
      the final checkpoint folder.
    """
    import torch.distributed as dist
    root = Path(root)
    name = f"iter_{int(step):07d}"
    tmp = root / f".tmp-{name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    ckpt.save(tmp / f"rank_{rank:05d}", step, params=params, opt_state=opt_state, config=config,
              data={"consumed_samples": int(consumed)}, extra=extra)
    dist.barrier()
    final = root / name
    if rank == 0:
        man = {"format": FORMAT, "version": 1, "step": int(step), "consumed_samples": int(consumed),
               "layout": layout, "config": config}
        (tmp / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True))
        _fsync_path(tmp / "manifest.json")
        _fsync_path(tmp)
        old = None
        if final.exists():  # re-saving a step: move the old one aside, drop it once the new one is in place
            old = root / f".tmp-old-{name}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_path(root)
        lt = root / ".tmp-latest"
        lt.write_text(name + "\n")
        _fsync_path(lt)
        os.replace(lt, root / ckpt.LATEST)  # the pointer moves last
        _fsync_path(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(root, params, opt_state, *, rank: int, layout: dict, config: dict):
    """Resume this rank from the latest multi-process checkpoint under ``root``.

    Returns:
      ``(params, opt_state, step, consumed_samples, folder)``, or None when ``root`` holds no
      checkpoint.

    Raises:
      CheckpointError: naming the file and the differing fields, when the checkpoint was written
        by a single-process run, under another layout (no resharding yet) or model config.
    """
    d = ckpt.latest(root)
    if d is None:
        return None
    mf = d / "manifest.json"
    man = json.loads(mf.read_text())
    if man.get("format") != FORMAT:
        raise CheckpointError(f"{mf} is a {man.get('format')!r} checkpoint, not a multi-process one ({FORMAT!r}); "
                              "resume it single-process, or start the parallel run from scratch")
    diff = ckpt.config_diff(man["layout"], layout)
    if diff:
        raise CheckpointError(f"{mf} was saved under another parallel layout (resharding is not supported yet); "
                              "differing: " + "; ".join(diff))
    diff = ckpt.config_diff(man.get("config"), config)
    if diff:
        raise CheckpointError(f"{mf} was saved for another model config; differing fields: " + "; ".join(diff))
    try:
        params, opt_state, m = ckpt.load(d / f"rank_{rank:05d}", params=params, opt_state=opt_state, config=config)
    except FileNotFoundError as e:
        raise CheckpointError(f"rank {rank}: {e}") from None
    if m["step"] != man["step"]:
        raise CheckpointError(f"{d / f'rank_{rank:05d}'} holds step {m['step']}, {mf} says {man['step']}")
    return params, opt_state, man["step"], int(m["data"]["consumed_samples"]), d
