"""Hugging Face checkpoint import / export (safetensors only; never unpickles).

``load_hf(dir)`` reads ``config.json`` (v4 or v5 style), picks the family by ``model_type``,
maps every declared parameter to its HF key through the family's name table, and reads the
tensors from ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``.
``save_hf`` writes the inverse: ``config.json`` plus single or sharded safetensors that
``transformers`` loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import families, tree
from ..model import Model, build
from ..ops import Kernels
from ..params import is_decl

__all__ = ["load_hf", "save_hf", "hf_state_dict", "read_safetensors_index"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def read_safetensors_index(d: Path) -> dict[str, Path]:
    """HF key -> file for a checkpoint folder (single file or sharded index)."""
    if (d / INDEX).exists():
        try:
            wm = json.loads((d / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{d / INDEX}: expected JSON with a 'weight_map' object ({e})") from None
        return {k: d / f for k, f in wm.items()}
    if (d / SINGLE).exists():
        with safe_open(d / SINGLE, framework="pt") as f:
            return {k: d / SINGLE for k in f.keys()}
    found = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    if any(n.endswith((".bin", ".pt", ".pth")) for n in found):
        raise ValueError(f"{d}: only pickle checkpoints found ({found}); pmodel reads safetensors only "
                         "(convert with transformers' save_pretrained(safe_serialization=True))")
    raise FileNotFoundError(f"{d}: neither {SINGLE} nor {INDEX} found (files: {found})")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "qwen.tiktoken")


def _check_tokenizer(d: Path, vocab_size: int) -> None:
    """If the folder ships a tokenizer, refuse a model whose vocabulary cannot hold its ids."""
    if not any((d / f).exists() for f in TOKENIZER_FILES):
        return
    from ..data import check_vocab_size, load_tokenizer
    try:
        check_vocab_size(load_tokenizer(d), vocab_size)
    except ValueError as e:
        raise ValueError(f"{d}: config.json vocab_size {vocab_size} does not fit the tokenizer in the "
                         f"same folder: {e}") from None


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None,
            kernels: Kernels | None = None, strict: bool = True,
            check_tokenizer: bool = True, progress: bool | None = None) -> tuple[Model, dict]:
    """Load an HF checkpoint folder.

    Args:
      path: folder with ``config.json`` and safetensors weights.
      dtype: parameter dtype (default: the checkpoint's ``dtype`` / ``torch_dtype``).
      device: where to put the parameters.
      kernels: the kernel policy for the returned model.
      strict: raise on checkpoint tensors that no parameter uses.
      check_tokenizer: when the folder holds a tokenizer, check that the model's vocabulary
        covers it (a clear error instead of out-of-range ids later).
      progress: show a progress bar over the tensors; None = only for checkpoints above 1 GiB.

    Returns:
      ``(model, params)``.
    """
    d = Path(path)
    fam, cfg = families.config_from_hf(d)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    model = build(cfg, kernels, family=fam.name)
    if check_tokenizer:
        _check_tokenizer(d, cfg.vocab_size)
    files = read_safetensors_index(d)

    wanted = {p: fam.hf_key(p) for p, _ in tree.paths(model.defs, is_leaf=is_decl)}
    missing = sorted(k for k in wanted.values() if k not in files)
    if missing:
        raise KeyError(f"{d}: checkpoint lacks {len(missing)} tensors the {fam.name} config needs, "
                       f"e.g. {missing[:5]}")
    used = set(wanted.values())
    extra = sorted(k for k in files if k not in used and not k.endswith(fam.ignore_hf_keys)
                   and not (cfg.tie_embeddings and k == "lm_head.weight"))
    if extra and strict:
        raise KeyError(f"{d}: checkpoint has {len(extra)} tensors this config does not use, e.g. {extra[:5]} "
                       "(pass strict=False to ignore them)")

    handles: dict[Path, object] = {}
    n_leaves = len(wanted)
    if progress is None:
        progress = sum(d.numel for d in tree.leaves(model.defs, is_leaf=is_decl)) * 2 > 2**30
    bar = tqdm(total=n_leaves, desc=f"load {d.name}", unit="tensor", disable=not progress)
    try:
        def read(path_: str, decl):
            bar.update(1)
            key = wanted[path_]
            f = files[key]
            if f not in handles:
                handles[f] = safe_open(f, framework="pt")
            t = handles[f].get_tensor(key)
            if tuple(t.shape) != decl.shape:
                raise ValueError(f"{f.name}: tensor {key!r} has shape {tuple(t.shape)}, "
                                 f"expected {decl.shape} for {path_}")
            t = t.to(dtype=decl.dtype or cfg.dtype, device=device).contiguous()
            return t.requires_grad_(decl.trainable and t.is_floating_point())

        params = tree.map_with_path(read, model.defs, is_leaf=is_decl)
    finally:
        handles.clear()
        bar.close()
    return model, params


def hf_state_dict(model: Model, params) -> dict[str, torch.Tensor]:
    """HF key -> tensor for ``params`` (plain tensors only: merge LoRA / gather shards first)."""
    fam = families.get(model.family or "llama")
    out = {}
    for p, t in tree.paths(params):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_hf: leaf {p} is {type(t).__name__}; merge or gather it to a plain tensor first")
        out[fam.hf_key(p)] = t.detach()
    return out


def save_hf(model: Model, params, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30,
            dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` + safetensors (sharded above ``max_shard_bytes``) that transformers loads.

    Returns:
      the output folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fam = families.get(model.family or "llama")
    cfg = model.config if dtype is None else model.config.replace(dtype=dtype)
    sd = {k: v.to(cfg.dtype).contiguous().cpu() for k, v in hf_state_dict(model, params).items()}

    shards: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for stale in [out / SINGLE, out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / SINGLE, metadata=meta)
    else:
        n = len(shards)
        wm = {}
        for i, s in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(s, out / name, metadata=meta)
            wm.update({k: name for k in s})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    (out / "config.json").write_text(json.dumps(fam.config_to_hf(cfg), indent=2) + "\n")
    return out
