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

**Experts** (MoE families; Mixtral): transformers 5 fuses each layer's experts into one module
with the 3-d parameters ``gate_up_proj`` ``(E, 2F, D)`` and ``down_proj`` ``(E, D, F)``, which
PEFT (>= 0.17) adapts with ``target_parameters`` (``experts.gate_up_proj``,
``experts.down_proj``): a ``ParamWrapper`` per parameter holds ``lora_A`` ``(E*r, in)`` (rows
expert-major: expert ``e``'s ``A`` is rows ``e*r .. e*r+r``) and ``lora_B`` ``(out, r*E)``
(columns rank-major: expert ``e``'s ``B`` is columns ``j*E + e``); several wrapped parameters of
one module nest, the parameter wrapped first (``gate_up_proj``) innermost, so its keys carry
``.base_layer``. pmodel's expert LoRA holds ``a`` ``(E, r, in)`` / ``b`` ``(E, out, r)`` per
stacked weight; ``gate_up_proj``'s adapter is gate's and up's (one ``A``, ``B`` rows gate then
up), as for the fused modules above. PEFT refuses dropout on such parameters.

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


def _peft_experts(fam):
    """The family's PEFT expert layout ``(module template, ((hf_param, pmodel_parts), ...))`` in
    the order transformers declares (and PEFT wraps) the parameters, or None."""
    if fam.name == "mixtral":
        from ..families.mixtral import PEFT_EXPERTS
        return PEFT_EXPERTS
    return None


def _expert_targets(template: str, params, target_parameters, layer: int) -> list[str]:
    """The HF expert parameters of layer ``layer`` that PEFT's ``target_parameters`` select (a
    name matches the full parameter name or a dotted suffix of it, as PEFT matches)."""
    mod = template.replace("{i}", str(layer))
    return [name for name, _ in params
            if any(f"{mod}.{name}" == t or f"{mod}.{name}".endswith("." + t) for t in target_parameters)]


def _experts_to_peft(model, fam, factors: dict) -> tuple[dict, list]:
    """PEFT tensors and ``target_parameters`` for the expert adapters ``{path: (a, b)}``."""
    if not factors:
        return {}, []
    spec = _peft_experts(fam)
    if spec is None:
        raise ValueError(f"save_adapter: the {fam.name} family has no PEFT layout for expert adapters")
    template, params = spec
    by_layer: dict[int, dict] = {}
    for path, ab in factors.items():
        pieces = path.split(".")  # layers.{i}.mlp.experts.{part}
        by_layer.setdefault(int(pieces[1]), {})[pieces[-1]] = ab
    out, targeted = {}, None
    for i, parts in sorted(by_layer.items()):
        names = [name for name, ours in params if any(p in parts for p in ours)]
        if targeted is None:
            targeted = names
        elif names != targeted:
            raise ValueError(f"save_adapter: layer {i} adapts the expert parameters {names}, another layer "
                             f"{targeted}; PEFT's target_parameters name the same parameters in every layer")
        for idx, name in enumerate(names):
            ours = dict(params)[name]
            absent = [p for p in ours if p not in parts]
            if absent:
                raise ValueError(f"save_adapter: transformers stores the experts' {list(ours)} as one parameter "
                                 f"{name!r}; a PEFT adapter on it covers all of them, but layer {i}'s {absent} "
                                 "carry no LoRA (target all of them, e.g. 'experts')")
            a = parts[ours[0]][0]
            unequal = [p for p in ours[1:] if not torch.equal(parts[p][0], a)]
            if unequal:
                raise ValueError(f"save_adapter: transformers stores the experts' {list(ours)} as one parameter "
                                 f"{name!r}, whose PEFT adapter has one A factor per expert, but layer {i}'s A "
                                 f"factors of {[ours[0], *unequal]} differ (trained as separate adapters); merge "
                                 "the adapter into the weights (pmodel.lora.merge + save_hf) instead")
            E, r, din = a.shape
            b = torch.cat([parts[p][1] for p in ours], dim=1)                 # (E, out, r)
            mod = template.replace("{i}", str(i)) + ".base_layer" * (len(names) - 1 - idx)
            out[f"{_PREFIX}{mod}.lora_A.weight"] = a.reshape(E * r, din).contiguous().cpu()
            out[f"{_PREFIX}{mod}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * E).contiguous().cpu()
    short = template.rsplit(".", 1)[-1]
    return out, [f"{short}.{n}" for n in targeted]


def _experts_from_peft(model, fam, cfg: dict, mods: dict, adapter_dir) -> tuple[dict, list, set]:
    """pmodel factors ``{path.a / path.b: tensor}``, the adapted expert paths and the HF module
    keys consumed, for the expert modules of a PEFT adapter."""
    spec = _peft_experts(fam)
    tp = cfg.get("target_parameters") or []
    if spec is None or not tp:
        return {}, [], set()
    template, params = spec
    rx = re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<nest>(?:\.base_layer)*)$")
    decls = dict(tree.paths(model.defs, is_leaf=is_decl))
    E, r = model.config.num_experts, int(cfg["r"])
    factors, paths, used = {}, [], set()
    for m, ab in mods.items():
        hit = rx.match(m)
        if hit is None:
            continue
        i, k = int(hit["i"]), hit["nest"].count(".base_layer")
        names = _expert_targets(template, params, tp, i)
        if k >= len(names):
            raise ValueError(f"{adapter_dir}: {m} is nested {k} deep, but target_parameters {tp} select "
                             f"{names} in layer {i}")
        ours = dict(params)[names[len(names) - 1 - k]]
        shapes = [decls[f"layers.{i}.mlp.experts.{p}"].shape for p in ours]   # (E, out, in) each
        din, dout = shapes[0][2], sum(s[1] for s in shapes)
        if tuple(ab["A"].shape) != (E * r, din) or tuple(ab["B"].shape) != (dout, r * E):
            raise ValueError(f"{adapter_dir}: {m} factors {tuple(ab['A'].shape)}, {tuple(ab['B'].shape)}; expected "
                             f"{(E * r, din)}, {(dout, r * E)} for {E} experts of rank {r}")
        a = ab["A"].reshape(E, r, din)
        b = ab["B"].reshape(dout, r, E).permute(2, 0, 1)                      # (E, out, r)
        for p, bp in zip(ours, b.split([s[1] for s in shapes], dim=1)):
            path = f"layers.{i}.mlp.experts.{p}"
            factors[f"{path}.a"], factors[f"{path}.b"] = a, bp.contiguous()
            paths.append(path)
        used.add(m)
    return factors, paths, used


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
    expert = {p: f for p, f in factors.items() if f[0].dim() == 3}
    factors = {p: f for p, f in factors.items() if p not in expert}
    layout = fam.tensors
    tensors, target_parameters = _experts_to_peft(model, fam, expert)
    modules, transposed = [], set()
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
    if target_parameters:
        config["target_parameters"] = target_parameters
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
    try:
        f = safe_open(w_file, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types
        raise ValueError(f"{w_file}: cannot be read as safetensors ({e}; a truncated file?)") from None
    with f:
        for key in f.keys():
            m = _KEY.match(key)
            if not key.startswith(_PREFIX) or m is None:
                raise ValueError(f"{w_file.name}: unexpected tensor {key!r}; expected "
                                 f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
            module = m["module"][len(_PREFIX):]
            try:
                mods.setdefault(module, {})[m["which"]] = f.get_tensor(key)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{w_file}: cannot read tensor {key!r} ({e}; a truncated file?)") from None
    for module, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{w_file.name}: module {module!r} has only lora_{''.join(ab)}")
        n = ab["A"].shape[0]
        if cfg.get("target_parameters") and n == ab["B"].shape[1] and n % cfg["r"] == 0:
            continue  # a ParamWrapper on a stacked (experts) parameter: rank r per expert
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
    factors, paths, used = _experts_from_peft(model, fam, cfg, mods, adapter_dir)
    mods = {m: ab for m, ab in mods.items() if m not in used}
    decls = {p.removesuffix(".weight"): d for p, d in tree.paths(model.defs, is_leaf=is_decl)
             if p.startswith("layers.") and p.endswith(".weight") and len(d.shape) == 2}
    by_hf = layout.modules(decls)
    unknown = sorted(m for m in mods if m not in by_hf)
    if unknown:
        raise ValueError(f"{adapter_dir}: adapter modules {unknown[:3]} are not {fam.name} weights "
                         f"(expected names like {next(iter(by_hf))})")
    transposed = {layout.locate(by_hf[m][0] + ".weight")[0].transpose for m in mods}
    if mods and (bool(cfg.get("fan_in_fan_out")) not in transposed or len(transposed) > 1):
        raise ValueError(f"{adapter_dir}: fan_in_fan_out={bool(cfg.get('fan_in_fan_out'))} in {ADAPTER_CONFIG}, "
                         f"but the {fam.name} checkpoint stores these modules "
                         f"{'transposed (Conv1D)' if True in transposed else 'as [out, in]'}")
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
