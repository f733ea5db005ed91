"""Gemma (HF ``gemma``): the LLaMA layout with ``(1 + w)`` RMSNorm, the embedding scaled by
sqrt(hidden) rounded to the activation dtype, tanh-GeGLU, head_dim 256, MQA on 2B, tied embeddings.
"""
from __future__ import annotations

import math
import types

from ..model import ModelConfig
from . import Family, _hf
from .llama import LLAMA_NAMES


def _activation(d: dict) -> str:
    # transformers 4.x reads hidden_activation first; the official configs say hidden_act "gelu",
    # a legacy value meant as the tanh approximation (transformers maps it so, with a warning).
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if d.get("hidden_activation") in ("gelu", "gelu_exact"):
        raise ValueError("GemmaForCausalLM config.json: hidden_activation 'gelu' (erf GeLU in a gated MLP) "
                         "is not implemented; pmodel's GeGLU uses the tanh approximation")
    if act not in ("gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        raise ValueError(f"GemmaForCausalLM config.json: unsupported activation {act!r}")
    return "geglu"


def config_from_hf(d: dict) -> ModelConfig:
    """GemmaConfig dict -> ModelConfig."""
    theta, scaling = _hf.rope(d)
    heads, D = d["num_attention_heads"], d["hidden_size"]
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=D, num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=d.get("head_dim") or D // heads,
        ffn_hidden_size=d["intermediate_size"], max_position_embeddings=d.get("max_position_embeddings", 8192),
        norm_eps=d.get("rms_norm_eps", 1e-6), norm_offset=1.0, rope_theta=theta, rope_scaling=scaling,
        qkv_bias=bias, o_bias=bias, activation=_activation(d), tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        embedding_scale=math.sqrt(D), init_std=d.get("initializer_range", 0.02), dtype=_hf.dtype(d),
    )


def config_to_hf(c: ModelConfig) -> dict:
    _hf.require(c, "GemmaForCausalLM", norm="rms", norm_offset=1.0, position="rope", activation="geglu",
                embedding_scale=math.sqrt(c.hidden_size), embedding_norm=False, qkv_bias=c.o_bias,
                mlp_bias=False, rotary_fraction=1.0, rope_interleaved=False, sliding_window=None)
    return {
        "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": c.max_position_embeddings,
        "initializer_range": c.init_std, "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.qkv_bias, "attention_dropout": 0.0, "bos_token_id": 2, "eos_token_id": 1,
        "pad_token_id": 0, "torch_dtype": _hf.dtype_name(c.dtype), "dtype": _hf.dtype_name(c.dtype),
        "use_cache": True, **_hf.rope_to_hf(c.rope_theta, c.rope_scaling_dict),
    }


def _g(**kw) -> ModelConfig:
    D = kw["hidden_size"]
    base = dict(vocab_size=256000, head_dim=256, max_position_embeddings=8192, norm_eps=1e-6, norm_offset=1.0,
                rope_theta=10000.0, activation="geglu", tie_embeddings=True, embedding_scale=math.sqrt(D))
    return ModelConfig(**{**base, **kw})


# google/gemma-2b and google/gemma-7b config.json
PRESETS = {
    "gemma-2b": _g(hidden_size=2048, num_layers=18, num_heads=8, num_kv_heads=1, ffn_hidden_size=16384),
    "gemma-7b": _g(hidden_size=3072, num_layers=28, num_heads=16, num_kv_heads=16, ffn_hidden_size=24576),
}

FAMILIES = (
    Family(name="gemma", hf_model_types=("gemma",), hf_architecture="GemmaForCausalLM",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=LLAMA_NAMES,
           chat_template="gemma", presets=types.MappingProxyType(PRESETS), reference="transformers GemmaForCausalLM"),
)
