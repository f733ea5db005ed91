"""Checkpoint building blocks: RNG capture / restore, atomic file writes, the ``latest``
pointer, config comparison and the error type.

The one training-checkpoint format (sharded, reshardable under any parallel layout, used by every
run) is :mod:`pmodel.checkpoint.sharded`, built on these. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .. import device as dev

__all__ = ["latest", "config_diff", "capture_rng", "restore_rng", "CheckpointError", "LATEST"]

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model / optimizer."""


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def capture_rng(device: torch.device | str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The process's RNG states: ``({"torch_cpu": ByteTensor[, "torch_<type>"]}, {"python", "numpy"})``.

    Args:
      device: an accelerator (``cuda``, ``npu``, ...) whose generator is saved too, under
        ``torch_<type>`` (None / cpu: CPU generators only).
    """
    st = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [st[0], list(st[1]), st[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and torch.device(device).type != "cpu":
        tensors[f"torch_{torch.device(device).type}"] = dev.rng_state(device)
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device | str | None = None) -> None:
    """Inverse of :func:`capture_rng` (the accelerator state goes to ``device`` when given)."""
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    key = f"torch_{torch.device(device).type}" if device is not None else None
    if key != "torch_cpu" and key in tensors:
        dev.set_rng_state(tensors[key], device)
    if "python" in meta:
        v, s, g = meta["python"]
        random.setstate((v, tuple(s), g))
    if "numpy" in meta:
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors refuses tensors that share storage; a clone per shared leaf keeps it simple.
    seen, out = set(), {}
    for k, v in tensors.items():
        key = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if key in seen else v
        if key is not None:
            seen.add(key)
    save_file(out, path, metadata={"format": "pt"})
    _fsync_path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The hex sha256 of a file's bytes (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def inside(root: str | os.PathLike, name: str, what: str) -> Path:
    """``root / name`` resolved, refused (:class:`CheckpointError`) when it leaves ``root``
    (``../x``, an absolute path, a link pointing out): every path read from a manifest, pointer or
    index goes through this."""
    base = Path(root).resolve()
    p = (base / name).resolve()
    if p != base and base not in p.parents:
        raise CheckpointError(f"{what}: the path {name!r} leaves the folder {Path(root)} (refused)")
    return p


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (per ``latest``; if that names a folder
    that is gone, the highest complete ``iter_*``), or None.

    Raises:
      CheckpointError: the ``latest`` pointer names a path outside ``root``.
    """
    root = Path(root)
    ptr = root / LATEST
    if ptr.exists():
        name = ptr.read_text().strip()
        inside(root, name, str(ptr))
        d = root / name
        if (d / "manifest.json").exists():
            return d
    done = sorted(d for d in root.glob("iter_*") if (d / "manifest.json").exists())
    return done[-1] if done else None


def config_diff(saved: dict | None, current: dict | None) -> list[str]:
    """``["field: saved=… current=…", ...]`` for every differing config field."""
    if saved is None or current is None:
        return []
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if a != b:
            out.append(f"{k}: checkpoint={a!r} current={b!r}")
    return out
