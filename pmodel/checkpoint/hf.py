"""Hugging Face checkpoint import / export (safetensors only; never unpickles).

``load_hf(dir)`` reads ``config.json`` (v4 or v5 style), picks the family by ``model_type``,
maps every declared parameter to its HF key through the family's name table, and reads the
tensors from ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``.
``save_hf`` writes the inverse: ``config.json`` plus single or sharded safetensors that
``transformers`` loads.
"""
from __future__ import annotations

import json
import math
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


def _check_size_against_disk(d: Path, cfg, files: dict) -> None:
    """Refuse a config that declares far more parameters than the weights on disk hold (a broken or
    hostile ``config.json``, e.g. ``num_hidden_layers: 1e9``), before any declaration is built: the
    count is taken from one and two layers and extrapolated, the disk size from the safetensors
    headers (no tensor is read)."""
    one = cfg.replace(num_layers=1).num_params()
    per_layer = cfg.replace(num_layers=2).num_params() - one
    declared = one + (cfg.num_layers - 1) * per_layer
    on_disk = 0
    for f in sorted(set(files.values())):
        try:
            with safe_open(f, framework="pt") as h:
                on_disk += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types
            raise ValueError(f"{f}: cannot be read as safetensors ({e}; a truncated file?)") from None
    # Slack for what the disk may lack or hold extra: a padded vocabulary, a tied output layer.
    if declared > 2 * on_disk + 10 * cfg.padded_vocab_size * cfg.hidden_size:
        raise ValueError(f"{d / 'config.json'}: describes {declared:,} parameters ({cfg.num_layers} layers, hidden "
                         f"{cfg.hidden_size}) but the safetensors files hold {on_disk:,} values; refusing to build "
                         "the model (a wrong or corrupted config.json?)")


def read_safetensors_index(d: Path) -> dict[str, Path]:
    """HF key -> file for a checkpoint folder (single file or sharded index)."""
    if (d / INDEX).exists():
        try:
            wm = json.loads((d / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{d / INDEX}: expected JSON with a 'weight_map' object ({e})") from None
        base = d.resolve()
        out = {}
        for k, f in wm.items():
            p = (base / str(f)).resolve()
            if not isinstance(f, str) or base not in p.parents:
                raise ValueError(f"{d / INDEX}: weight_map[{k!r}] = {f!r} leaves the folder {d} (refused)")
            out[k] = d / f
        return out
    if (d / SINGLE).exists():
        try:
            f = safe_open(d / SINGLE, framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types
            raise ValueError(f"{d / SINGLE}: cannot be read as safetensors ({e}; a truncated file?)") from None
        with f:
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
    files = read_safetensors_index(d)
    _check_size_against_disk(d, cfg, files)  # before building any declaration
    model = build(cfg, kernels, family=fam.name)
    if check_tokenizer:
        _check_tokenizer(d, cfg.vocab_size)

    decls = dict(tree.paths(model.defs, is_leaf=is_decl))
    layout = fam.tensors
    wanted = layout.leaves(decls)  # checkpoint key -> the pmodel leaves it holds
    missing = sorted(k for k in wanted if k not in files)
    if missing:
        raise KeyError(f"{d}: checkpoint lacks {len(missing)} tensors the {fam.name} config needs, "
                       f"e.g. {missing[:5]}")
    extra = sorted(k for k in files if k not in wanted and not k.endswith(fam.ignore_hf_keys)
                   and not (cfg.tie_embeddings and k == layout.hf_module("lm_head.weight")))
    if extra and strict:
        raise KeyError(f"{d}: checkpoint has {len(extra)} tensors this config does not use, e.g. {extra[:5]} "
                       "(pass strict=False to ignore them)")

    handles: dict[Path, object] = {}
    if progress is None:
        progress = sum(x.numel for x in decls.values()) * 2 > 2**30
    bar = tqdm(total=len(wanted), desc=f"load {d.name}", unit="tensor", disable=not progress)

    def read(key: str) -> torch.Tensor:
        bar.update(1)
        f = files[key]
        try:
            if f not in handles:
                handles[f] = safe_open(f, framework="pt")
            return handles[f].get_tensor(key)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types
            raise ValueError(f"{f}: cannot read tensor {key!r} ({e}; a truncated or missing file?)") from None

    try:
        flat = layout.from_hf(cfg, decls, read, where=str(d))
    finally:
        handles.clear()
        bar.close()

    def leaf(path_: str, decl):
        t = flat[path_].to(dtype=decl.dtype or cfg.dtype, device=device).contiguous()
        return t.requires_grad_(decl.trainable and t.is_floating_point())

    params = tree.map_with_path(leaf, model.defs, is_leaf=is_decl)
    return model, params


def hf_state_dict(model: Model, params) -> dict[str, torch.Tensor]:
    """HF key -> tensor for ``params`` (plain tensors only: merge LoRA / gather shards first),
    in the family's checkpoint layout (fused, interleaved, transposed, vocab rows cut)."""
    fam = families.get(model.family or "llama")
    flat = {}
    for p, t in tree.paths(params):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_hf: leaf {p} is {type(t).__name__}; merge or gather it to a plain tensor first")
        flat[p] = t.detach()
    decls = dict(tree.paths(model.defs, is_leaf=is_decl))
    return fam.tensors.to_hf(model.config, flat, decls)


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
    hf_config = fam.config_to_hf(cfg)  # refuses what the family cannot express, before writing
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
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out
