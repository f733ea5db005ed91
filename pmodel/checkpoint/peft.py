"""PEFT-format LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key names follow PEFT's saved format for a causal LM: the HF module name (from the family's
tensor layout, :mod:`pmodel.families.tensors`) under ``base_model.model.``, then
``lora_A.weight`` (``[r, in]``) or ``lora_B.weight`` (``[out, r]``), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``. For a one-to-one module
these are exactly pmodel's ``a`` and ``b`` factors. Where the family's checkpoint fuses several
pmodel modules into one (Baichuan ``W_pack``, Qwen ``c_attn``, Bloom / ChatGLM
``query_key_value``, ChatGLM ``dense_h_to_4h``), PEFT trains one adapter on the fused module:
one ``A`` and a ``B`` whose rows are the parts' rows in the family's order (interleaved per head
for Bloom). Loading gives every part that ``A`` and its rows of ``B`` (the same function);
saving writes that layout back, which needs the parts' ``A`` factors to be equal (true for an
adapter loaded from such a file; separately trained factors are refused with the reason).
``fan_in_fan_out`` is written (and expected) for families whose checkpoint stores the weights
transposed (GPT-2's ``Conv1D``), as PEFT itself sets it; the factors keep ``[r, in]`` /
``[out, r]``. ``peft.PeftModel.from_pretrained`` loads what :func:`save_adapter` writes, and
:func:`load_adapter` reads what PEFT saves.

Only plain LoRA is read: DoRA, trained biases, ``modules_to_save`` and per-module rank / alpha
patterns raise with the reason instead of loading something different.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import families, lora as _lora, tree
from ..params import is_decl

__all__ = ["save_adapter", "load_adapter", "read_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT writes "<module>.lora_A.weight"; some older files keep the adapter name before "weight".
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _family(model):
    return families.get(model.family or "llama")


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(model, params, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write the LoRA factors of ``params`` in PEFT's format.

    Args:
      model: the LoRA model (its family gives the HF module names).
      params: its params (LoRA leaves; only ``a`` and ``b`` are written).
      out_dir: folder to create / overwrite.
      base_model_name_or_path: recorded in the config (PEFT uses it when no base model is given).

    Returns:
      the folder.
    """
    fam = _family(model)
    spec = _lora.spec_of(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, n in tree.paths(params, is_leaf=_lora.is_lora):
        if not _lora.is_lora(n):
            continue
        for t in (n.a, n.b):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"save_adapter: {path} holds a {type(t).__name__} factor; gather shards first")
        factors[path.removesuffix(".weight")] = (n.a.detach(), n.b.detach())
    if not factors:
        raise ValueError("save_adapter: params hold no LoRA leaves")
    layout = fam.tensors
    tensors, modules, transposed = {}, [], set()
    for module, parts in layout.modules(factors).items():
        absent = [p for p in parts if p not in factors]
        if absent:
            raise ValueError(f"save_adapter: the {fam.name} checkpoint stores {list(parts)} as one module "
                             f"{module!r}; a PEFT adapter on it covers all of them, but {absent} carry no "
                             "LoRA (target all of them, e.g. 'query_key_value' / 'dense_h_to_4h')")
        a = factors[parts[0]][0]
        unequal = [p for p in parts[1:] if not torch.equal(factors[p][0], a)]
        if unequal:
            raise ValueError(f"save_adapter: the {fam.name} checkpoint stores {list(parts)} as one module "
                             f"{module!r}, whose PEFT adapter has one A factor, but the A factors of "
                             f"{[parts[0], *unequal]} differ (trained as separate adapters); merge the "
                             "adapter into the weights (pmodel.lora.merge + save_hf) instead")
        b = layout.rows_to_hf(model.config, module, [factors[p][1] for p in parts])
        transposed.add(layout.locate(parts[0] + ".weight")[0].transpose)
        modules.append(module)
        tensors[f"{_PREFIX}{module}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"{_PREFIX}{module}.lora_B.weight"] = b.contiguous().cpu()
    if len(transposed) > 1:
        raise ValueError(f"save_adapter: the adapted {fam.name} modules mix transposed (Conv1D) and plain "
                         "weights; PEFT's fan_in_fan_out is one flag per adapter")

    # Name list when every layer carries the same projections (PEFT's usual form); otherwise a
    # regex that full-matches exactly the adapted module names.
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    per_name = {nm: sum(m.endswith("." + nm) for m in modules) for nm in names}
    all_layers = all(c == model.config.num_layers for c in per_name.values())
    targets = names if all_layers else "|".join(re.escape(m) for m in modules)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": _num(spec.alpha),
        "lora_dropout": spec.dropout, "target_modules": targets, "bias": "none",
        "fan_in_fan_out": transposed == {True}, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": bool(spec.rslora), "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }
    save_file(tensors, out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, {hf_module: {"A": tensor, "B": tensor}})`` from a PEFT adapter folder, validated."""
    d = Path(adapter_dir)
    cfg_file, w_file = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_file.exists():
        raise FileNotFoundError(f"{d}: no {ADAPTER_CONFIG}")
    if not w_file.exists():
        pickled = [p.name for p in d.glob("adapter_model.bin")]
        hint = " (only a pickle adapter_model.bin: pmodel reads safetensors only)" if pickled else ""
        raise FileNotFoundError(f"{d}: no {ADAPTER_WEIGHTS}{hint}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {
        "use_dora": bool(cfg.get("use_dora")),
        "bias": cfg.get("bias", "none") != "none",
        "modules_to_save": bool(cfg.get("modules_to_save")),
        "rank_pattern": bool(cfg.get("rank_pattern")),
        "alpha_pattern": bool(cfg.get("alpha_pattern")),
        "layer_replication": bool(cfg.get("layer_replication")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{cfg_file}: unsupported adapter settings {bad} (pmodel reads plain LoRA)")
    for k in ("r", "lora_alpha"):
        if k not in cfg:
            raise ValueError(f"{cfg_file}: missing key {k!r}")
    mods: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(w_file, framework="pt") as f:
        for key in f.keys():
            m = _KEY.match(key)
            if not key.startswith(_PREFIX) or m is None:
                raise ValueError(f"{w_file.name}: unexpected tensor {key!r}; expected "
                                 f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
            module = m["module"][len(_PREFIX):]
            mods.setdefault(module, {})[m["which"]] = f.get_tensor(key)
    for module, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{w_file.name}: module {module!r} has only lora_{''.join(ab)}")
        if ab["A"].shape[0] != cfg["r"] or ab["B"].shape[1] != cfg["r"]:
            raise ValueError(f"{w_file.name}: {module} factors {tuple(ab['A'].shape)}, {tuple(ab['B'].shape)} "
                             f"do not have rank r={cfg['r']} from {ADAPTER_CONFIG}")
    if not mods:
        raise ValueError(f"{w_file}: holds no LoRA tensors")
    return cfg, mods


def load_adapter(model, params, adapter_dir: str | os.PathLike):
    """Apply a PEFT LoRA adapter to a plain model and its params.

    Args:
      model: the base :class:`~pmodel.model.Model` (e.g. from ``load_hf``), without LoRA.
      params: its params.
      adapter_dir: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
      ``(lora_model, lora_params)``: adapted modules are exactly those in the file; rank, alpha,
      dropout and ``use_rslora`` come from the config.
    """
    if "lora" in model.transforms:
        raise ValueError("load_adapter: model already has LoRA; pass the base model "
                         "(pmodel.lora.base_model(model)) and plain params")
    cfg, mods = read_adapter(adapter_dir)
    fam = _family(model)
    layout = fam.tensors
    decls = {p.removesuffix(".weight"): d for p, d in tree.paths(model.defs, is_leaf=is_decl)
             if p.startswith("layers.") and p.endswith(".weight") and len(d.shape) == 2}
    by_hf = layout.modules(decls)
    unknown = sorted(m for m in mods if m not in by_hf)
    if unknown:
        raise ValueError(f"{adapter_dir}: adapter modules {unknown[:3]} are not {fam.name} weights "
                         f"(expected names like {next(iter(by_hf))})")
    transposed = {layout.locate(by_hf[m][0] + ".weight")[0].transpose for m in mods}
    if bool(cfg.get("fan_in_fan_out")) not in transposed or len(transposed) > 1:
        raise ValueError(f"{adapter_dir}: fan_in_fan_out={bool(cfg.get('fan_in_fan_out'))} in {ADAPTER_CONFIG}, "
                         f"but the {fam.name} checkpoint stores these modules "
                         f"{'transposed (Conv1D)' if True in transposed else 'as [out, in]'}")
    factors, paths = {}, []
    for m, ab in mods.items():
        parts = by_hf[m]
        want_in = decls[parts[0]].shape[1]
        if ab["A"].shape[1] != want_in:
            raise ValueError(f"{adapter_dir}: {m}.lora_A has shape {tuple(ab['A'].shape)}, expected "
                             f"(r, {want_in})")
        bs = layout.rows_from_hf(model.config, m, ab["B"], [decls[p].shape[0] for p in parts])
        for p, b in zip(parts, bs):
            factors[f"{p}.weight.a"] = ab["A"]
            factors[f"{p}.weight.b"] = b
            paths.append(p)
    pattern = "|".join(re.escape(p) for p in paths)
    lmodel = _lora.lora(model, rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                        dropout=float(cfg.get("lora_dropout") or 0.0), targets=pattern,
                        rslora=bool(cfg.get("use_rslora")))
    lparams = _lora.adapt(lmodel, params, 0)  # placeholder factors, all overwritten from the file
    return lmodel, _lora.load_adapter_params(lparams, factors)
