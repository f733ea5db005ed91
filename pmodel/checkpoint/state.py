"""Training checkpoints: params, optimizer state, step, RNG states and data position.

Layout of a checkpoint root (Megatron-style names)::

    root/
      latest                      text: the name of the newest complete checkpoint
      iter_0000010/
        params.safetensors        every params leaf by dotted path
        optimizer.safetensors     every optimizer-state tensor by dotted path
        rng.safetensors           torch CPU generator state
        manifest.json             step, model config, data position, RNG (python / numpy),
                                  non-tensor state leaves, file list (written last)

Saving is atomic: everything goes into a hidden temp folder, each file and the folder are
fsynced, the folder is renamed into place, and only then is ``latest`` replaced (itself via
temp file + fsync + rename). A crash at any point leaves the previous checkpoint and a
``latest`` that names it; stale temp folders are removed by the next save.

Loading fills a *template* (the params of a freshly built model, ``tx.init(params)`` for the
optimizer) in place, so tensors keep their identity, device and ``requires_grad``; every key,
shape and dtype is checked, and a model config that differs from the saved one is refused with
the differing fields named. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import tree

__all__ = ["save", "load", "latest", "read_manifest", "config_diff", "capture_rng", "restore_rng",
           "CheckpointError"]

FORMAT = "pmodel-train-checkpoint"
VERSION = 1
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the given model / optimizer."""


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors(t: Any, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a pytree into ``{path: tensor}`` and ``{path: json scalar}``."""
    tensors, scalars = {}, {}
    for path, leaf in tree.paths(t):
        if leaf is None:  # frozen leaves have no state
            continue
        if isinstance(leaf, torch.Tensor):
            tensors[path] = leaf.detach().to("cpu").contiguous().clone() if leaf.device.type != "cpu" \
                else leaf.detach().contiguous()
        elif isinstance(leaf, (bool, int, float, str)):
            scalars[path] = leaf
        else:
            raise TypeError(f"checkpoint: {what} leaf {path!r} is a {type(leaf).__name__}; only tensors and "
                            "bool/int/float/str can be saved")
    return tensors, scalars


def capture_rng(device: torch.device | str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The process's RNG states: ``({"torch_cpu": ByteTensor[, "torch_cuda"]}, {"python", "numpy"})``.

    Args:
      device: a CUDA device whose generator is saved too (None / cpu: CPU generators only).
    """
    st = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [st[0], list(st[1]), st[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and torch.device(device).type == "cuda":
        from ..ops import cuda
        tensors["torch_cuda"] = cuda.rng_state(torch.device(device))
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device | str | None = None) -> None:
    """Inverse of :func:`capture_rng` (the CUDA state goes to ``device`` when given)."""
    if "torch_cpu" in tensors:
        torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and device is not None and torch.device(device).type == "cuda":
        from ..ops import cuda
        cuda.set_rng_state(tensors["torch_cuda"], torch.device(device))
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


def save(root: str | os.PathLike, step: int, *, params: Any, opt_state: Any = None, config: dict | None = None,
         data: dict | None = None, extra: dict | None = None, rng: bool = True, keep_last: int | None = None,
         on_file_written: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint atomically and move ``latest`` to it.

    Args:
      root: checkpoint root folder (created if needed).
      step: the iteration count after which this is saved.
      params: the params pytree.
      opt_state: the optimizer state pytree (tensors and JSON scalars), or None.
      config: the model config dict (``ModelConfig.to_dict()``); checked on load.
      data: the data position (e.g. ``{"consumed_samples": 1280}``) and anything the data
        pipeline needs to resume.
      extra: more JSON-serialisable metadata (training arguments, ...).
      rng: also save the torch CPU / python / numpy RNG states (and the CUDA generator of the
        params' device when they live on a GPU).
      keep_last: delete older ``iter_*`` checkpoints, keeping this many (None keeps all).
      on_file_written: called with each file's path once it is written and fsynced (progress
        reporting; tests use it to interrupt a save halfway).

    Returns:
      the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{int(step):07d}"
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()

    p_t, p_s = _tensors(params, "params")
    files = {"params": "params.safetensors"}
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "step": int(step), "config": config, "data": data or {},
        "extra": extra or {}, "scalars": {"params": p_s}, "files": files,
    }
    _write_safetensors(tmp / files["params"], p_t)
    if on_file_written:
        on_file_written(tmp / files["params"])
    if opt_state is not None:
        o_t, o_s = _tensors(opt_state, "optimizer state")
        files["optimizer"] = "optimizer.safetensors"
        manifest["scalars"]["optimizer"] = o_s
        _write_safetensors(tmp / files["optimizer"], o_t)
        if on_file_written:
            on_file_written(tmp / files["optimizer"])
    if rng:
        first = next((x for x in tree.leaves(params) if isinstance(x, torch.Tensor)), None)
        r_t, r_meta = capture_rng(first.device if first is not None else None)
        files["rng"] = "rng.safetensors"
        manifest["rng"] = r_meta
        _write_safetensors(tmp / files["rng"], r_t)
        if on_file_written:
            on_file_written(tmp / files["rng"])
    mpath = tmp / "manifest.json"
    mpath.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_path(mpath)
    if on_file_written:
        on_file_written(mpath)
    _fsync_path(tmp)

    final = root / name
    old = None
    if final.exists():  # re-saving the same step: move the old one aside first
        old = root / f".tmp-old-{name}-{os.getpid()}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(root)
    lt = root / f".tmp-{LATEST}-{os.getpid()}"
    lt.write_text(name + "\n")
    _fsync_path(lt)
    os.replace(lt, root / LATEST)   # the pointer moves last
    _fsync_path(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        done = sorted(d for d in root.glob("iter_*") if (d / "manifest.json").exists())
        for d in done[:-keep_last] if keep_last > 0 else []:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    return final


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (per ``latest``; if that names a folder
    that is gone, the highest complete ``iter_*``), or None."""
    root = Path(root)
    ptr = root / LATEST
    if ptr.exists():
        d = root / ptr.read_text().strip()
        if (d / "manifest.json").exists():
            return d
    done = sorted(d for d in root.glob("iter_*") if (d / "manifest.json").exists())
    return done[-1] if done else None


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if (p / "manifest.json").exists():
        return p
    d = latest(p)
    if d is None:
        raise FileNotFoundError(f"{p}: no complete checkpoint (no manifest.json here, no '{LATEST}' pointer "
                                "or iter_* folder with one)")
    return d


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a checkpoint folder (or of the latest checkpoint under a root)."""
    d = _resolve(path)
    f = d / "manifest.json"
    try:
        m = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if m.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a pmodel training checkpoint (format {m.get('format')!r}, expected {FORMAT!r})")
    if m.get("version") != VERSION:
        raise CheckpointError(f"{f}: checkpoint format version {m.get('version')} is not supported "
                              f"(this pmodel reads version {VERSION})")
    m["dir"] = str(d)
    return m


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


def _fill(template: Any, f, file: Path, scalars: dict, what: str, strict: bool) -> Any:
    keys = set(f.keys())
    want = {p for p, leaf in tree.paths(template) if isinstance(leaf, torch.Tensor)}
    missing = sorted(want - keys)
    unexpected = sorted(keys - want)
    if missing or (strict and unexpected):
        raise CheckpointError(f"{file}: {what} keys do not match: missing {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''}")

    def put(path: str, leaf):
        if isinstance(leaf, torch.Tensor):
            t = f.get_tensor(path)
            if tuple(t.shape) != tuple(leaf.shape) or t.dtype != leaf.dtype:
                raise CheckpointError(f"{file}: {what} {path!r} is {t.dtype}{tuple(t.shape)}, expected "
                                      f"{leaf.dtype}{tuple(leaf.shape)}")
            with torch.no_grad():
                leaf.copy_(t)
            return leaf
        if path in scalars:
            return type(leaf)(scalars[path]) if isinstance(leaf, (bool, int, float, str)) else scalars[path]
        if isinstance(leaf, (bool, int, float, str)):
            raise CheckpointError(f"{file}: {what} scalar {path!r} missing from the manifest")
        return leaf

    return tree.map_with_path(put, template)


def load(path: str | os.PathLike, *, params: Any, opt_state: Any = None, config: dict | None = None,
         restore_rng_state: bool = True, strict: bool = True) -> tuple[Any, Any, dict]:
    """Load a checkpoint into templates, in place.

    Args:
      path: a checkpoint folder, or a root (its ``latest`` is used).
      params: params pytree to fill (shapes, dtypes and paths must match).
      opt_state: optimizer state template (``tx.init(params)``) or None to skip it.
      config: the current model config dict; if the checkpoint's differs, a
        :class:`CheckpointError` names every differing field.
      restore_rng_state: restore the torch CPU / python / numpy RNG states.
      strict: refuse checkpoint tensors that the templates do not have.

    Returns:
      ``(params, opt_state, manifest)``; ``manifest`` has ``step``, ``data``, ``extra``, ``dir``.
    """
    m = read_manifest(path)
    d = Path(m["dir"])
    diff = config_diff(m.get("config"), config)
    if diff:
        raise CheckpointError(f"{d}: the checkpoint was saved for a different model config; differing fields: "
                              + "; ".join(diff))
    files = m["files"]
    with safe_open(d / files["params"], framework="pt") as f:
        params = _fill(params, f, d / files["params"], m["scalars"].get("params", {}), "params", strict)
    if opt_state is not None:
        if "optimizer" not in files:
            raise CheckpointError(f"{d}: checkpoint has no optimizer state (saved without one); load params only "
                                  "by passing opt_state=None")
        with safe_open(d / files["optimizer"], framework="pt") as f:
            opt_state = _fill(opt_state, f, d / files["optimizer"], m["scalars"].get("optimizer", {}),
                              "optimizer state", strict)
    if restore_rng_state and "rng" in files:
        with safe_open(d / files["rng"], framework="pt") as f:
            first = next((x for x in tree.leaves(params) if isinstance(x, torch.Tensor)), None)
            restore_rng({k: f.get_tensor(k) for k in f.keys()}, m.get("rng", {}),
                        first.device if first is not None else None)
    return params, opt_state, m
