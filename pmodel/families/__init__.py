"""Model families: presets, the Hugging Face name / layout mapping, chat template.

A :class:`Family` is data plus two small functions (HF config.json <-> :class:`ModelConfig`).
The decoder itself is shared (:mod:`pmodel.model`); a family module holds only what is unique.

Entry points:
  ``preset(name)``            -> a :class:`~pmodel.model.Model` (nothing allocated)
  ``config_from_hf(dir)``     -> ``(family, ModelConfig)`` from an HF ``config.json`` (v4 or v5 style)
  ``get(name)`` / ``for_hf_type(model_type)`` -> :class:`Family`
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import types
from pathlib import Path
from typing import Callable

from ..model import Model, ModelConfig, build
from ..ops import Kernels
from .tensors import Map, TensorLayout

__all__ = ["Family", "Map", "TensorLayout", "preset", "preset_config", "presets", "config_from_hf", "get",
           "for_hf_type", "names", "FAMILY_MODULES"]

# The registry is data: every module listed here exports ``FAMILIES`` (a tuple of Family).
FAMILY_MODULES = ("llama", "qwen2", "gpt2", "bloom", "gemma", "internlm", "baichuan", "qwen", "chatglm", "mixtral")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """One model family.

    Attributes:
      name: family name (``"llama"``, ``"mistral"``, ``"qwen2"``, ...).
      hf_model_types: HF ``model_type`` values this family reads.
      hf_architecture: the ``architectures`` entry written on export.
      config_from_hf: ``dict -> ModelConfig``.
      config_to_hf: ``ModelConfig -> dict`` (config.json contents).
      names: the checkpoint tensor layout, one entry per module: :class:`~.tensors.Map`
        (renames, fused modules and their row order, per-head interleave, transposes) or a
        ``(pmodel_template, hf_template)`` pair for a rename; ``{i}`` is the layer index.
      chat_template: default chat template name (see :mod:`pmodel.data`).
      presets: name -> ModelConfig, each citing its source in the family module.
      ignore_hf_keys: HF key suffixes that are derived buffers, not parameters.
      reference: where its numerics are verified (documentation).
    """

    name: str
    hf_model_types: tuple[str, ...]
    hf_architecture: str
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    names: tuple[tuple[str, str], ...]
    chat_template: str = "default"
    presets: types.MappingProxyType = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    ignore_hf_keys: tuple[str, ...] = ("rotary_emb.inv_freq",)
    reference: str = ""

    @functools.cached_property
    def tensors(self) -> TensorLayout:
        """The compiled tensor layout (names, fusions, transposes; see :mod:`.tensors`)."""
        return TensorLayout(self.name, self.names)

    def hf_key(self, path: str) -> str:
        """HF checkpoint key holding a pmodel parameter (``layers.3.attn.q_proj.weight``);
        for a fused module it is the fused tensor (use :attr:`tensors` to split it)."""
        return self.tensors.hf_module(path)


def _registry() -> types.MappingProxyType:
    fams = {}
    for modname in FAMILY_MODULES:
        for fam in importlib.import_module(f"{__name__}.{modname}").FAMILIES:
            if fam.name in fams:
                raise ValueError(f"family {fam.name!r} is registered twice")
            fams[fam.name] = fam
    return types.MappingProxyType(fams)


def get(name: str) -> Family:
    fams = _registry()
    if name not in fams:
        raise KeyError(f"unknown family {name!r}; known: {sorted(fams)}")
    return fams[name]


def for_hf_type(model_type: str) -> Family:
    for fam in _registry().values():
        if model_type in fam.hf_model_types:
            return fam
    known = sorted(t for f in _registry().values() for t in f.hf_model_types)
    raise ValueError(f"unsupported HF model_type {model_type!r}; supported: {known}")


def presets() -> dict[str, tuple[str, ModelConfig]]:
    """All presets: name -> (family name, config)."""
    out = {}
    for fam in _registry().values():
        for n, c in fam.presets.items():
            out[n] = (fam.name, c)
    return out


def names() -> list[str]:
    return sorted(presets())


def preset_config(name: str) -> tuple[str, ModelConfig]:
    table = presets()
    if name not in table:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(table))}")
    return table[name]


def preset(name: str, *, kernels: Kernels | None = None, **overrides) -> Model:
    """The :class:`Model` for a preset (nothing is allocated; use ``pmodel.init``).

    Args:
      name: e.g. ``"llama2-7b"``, ``"qwen1.5-0.5b"``, ``"debug"``; see :func:`names`.
      overrides: ModelConfig fields to replace (``num_layers=2``, ``dtype=torch.bfloat16``).
    """
    fam, cfg = preset_config(name)
    if overrides:
        cfg = cfg.replace(**overrides)
    return build(cfg, kernels, family=fam)


def read_hf_config(path: str | Path) -> dict:
    p = Path(path)
    f = p / "config.json" if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"no config.json at {f}")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None


# config.json fields checked before anything is built: (kind, lower bound, upper bound, may be null).
# The upper bounds are far above any released model and keep a hostile file from making pmodel
# declare parameters without bound.
_SIZE, _COUNT = 1 << 22, 1 << 16
_HF_FIELDS = {
    **{k: ("int", 1, 1 << 26, False) for k in ("vocab_size",)},
    **{k: ("int", 1, 1 << 26, True) for k in ("padded_vocab_size",)},
    **{k: ("int", 1, _SIZE, False) for k in ("hidden_size", "n_embd", "n_embed")},
    **{k: ("int", 1, _SIZE, True) for k in ("intermediate_size", "n_inner", "ffn_hidden_size", "head_dim",
                                              "kv_channels", "max_position_embeddings", "n_positions",
                                              "seq_length", "sliding_window", "model_max_length")},
    **{k: ("int", 1, _COUNT, False) for k in ("num_hidden_layers", "n_layer", "num_layers", "num_attention_heads",
                                                "n_head")},
    **{k: ("int", 1, _COUNT, True) for k in ("num_key_value_heads", "multi_query_group_num", "num_local_experts",
                                               "num_experts_per_tok", "max_window_layers",
                                               "make_vocab_size_divisible_by")},
    **{k: ("float", 0.0, None, True) for k in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon",
                                                 "layernorm_epsilon", "rope_theta", "rotary_emb_base",
                                                 "initializer_range", "rotary_pct", "router_aux_loss_coef")},
    **{k: ("bool", None, None, True) for k in ("tie_word_embeddings", "attention_bias", "mlp_bias")},
}


def check_hf_config(d: dict, where: str = "config.json") -> None:
    """Refuse wrong types and out-of-range values of the size fields of an HF ``config.json``
    (``ValueError`` naming the field and ``where``), before anything is built from it."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    for k, (kind, lo, hi, nullable) in _HF_FIELDS.items():
        if k not in d:
            continue
        v = d[k]
        if v is None:
            if nullable:
                continue
            raise ValueError(f"{where}: field {k!r} is null; expected {'an integer' if kind == 'int' else kind}")
        if kind == "bool":
            if not isinstance(v, bool):
                raise ValueError(f"{where}: field {k!r} = {v!r} must be true or false")
            continue
        if kind == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{where}: field {k!r} = {v!r} must be an integer")
            if v < lo or v > hi:
                raise ValueError(f"{where}: field {k!r} = {v} is outside [{lo}, {hi}]")
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{where}: field {k!r} = {v!r} must be a finite number")
            if v < lo:
                raise ValueError(f"{where}: field {k!r} = {v} must be >= {lo}")


def config_from_hf(path: str | Path | dict) -> tuple[Family, ModelConfig]:
    """``(family, ModelConfig)`` from an HF checkpoint dir, a config.json path or its dict.

    Raises:
      ValueError: a field of the wrong type or out of range (naming the field and the file),
        no ``model_type``, or settings pmodel does not implement.
    """
    d = path if isinstance(path, dict) else read_hf_config(path)
    where = "config.json" if isinstance(path, dict) else str(
        Path(path) / "config.json" if Path(path).is_dir() else Path(path))
    check_hf_config(d, where)
    if "model_type" not in d:
        raise ValueError(f"{path}: config.json has no 'model_type' key")
    fam = for_hf_type(d["model_type"])
    try:
        return fam, fam.config_from_hf(d)
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{where}: cannot read the {d['model_type']} config ({type(e).__name__}: {e})") from None
