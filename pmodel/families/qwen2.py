"""Qwen1.5 (HF ``qwen2``): the LLaMA decoder with q/k/v biases (no o_proj bias)."""
from __future__ import annotations

import types

from ..model import ModelConfig
from . import Family, _hf
from .llama import LLAMA_NAMES


def config_from_hf(d: dict) -> ModelConfig:
    theta, scaling = _hf.rope(d)
    heads = d["num_attention_heads"]
    window = d.get("sliding_window") if d.get("use_sliding_window", False) else None
    if window is not None and d.get("max_window_layers", d["num_hidden_layers"]) < d["num_hidden_layers"]:
        raise ValueError("qwen2 config: sliding window on only some layers (max_window_layers) is not supported")
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, ffn_hidden_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 32768), norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, qkv_bias=True,
        activation=_hf.activation(d.get("hidden_act", "silu")),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), sliding_window=window,
        init_std=d.get("initializer_range", 0.02), dtype=_hf.dtype(d),
    )


def config_to_hf(c: ModelConfig) -> dict:
    if not c.qkv_bias or c.o_bias or c.mlp_bias:
        raise ValueError("Qwen2ForCausalLM has q/k/v biases only (qkv_bias=True, o_bias=mlp_bias=False)")
    if c.norm != "rms" or c.position != "rope" or c.activation != "swiglu" or c.rope_interleaved \
            or c.rotary_fraction != 1.0 or c.padded_vocab_size != c.vocab_size:
        raise ValueError("Qwen2ForCausalLM cannot express this ModelConfig (norm/position/activation/rotary/vocab padding)")
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "use_sliding_window": c.sliding_window is not None, "sliding_window": c.sliding_window,
        "max_window_layers": c.num_layers, "attention_dropout": 0.0,
        "torch_dtype": _hf.dtype_name(c.dtype), "dtype": _hf.dtype_name(c.dtype), "use_cache": True,
        **_hf.rope_to_hf(c.rope_theta, c.rope_scaling_dict),
    }


def _q(**kw) -> ModelConfig:
    base = dict(max_position_embeddings=32768, norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True)
    return ModelConfig(**{**base, **kw})


# Qwen/Qwen1.5-{0.5B,1.8B,4B,7B,14B,32B,72B} config.json
PRESETS = {
    "qwen1.5-0.5b": _q(vocab_size=151936, hidden_size=1024, num_layers=24, num_heads=16,
                       ffn_hidden_size=2816, tie_embeddings=True),
    "qwen1.5-1.8b": _q(vocab_size=151936, hidden_size=2048, num_layers=24, num_heads=16, ffn_hidden_size=5504),
    "qwen1.5-4b": _q(vocab_size=151936, hidden_size=2560, num_layers=40, num_heads=20, ffn_hidden_size=6912,
                     rope_theta=5000000.0),
    "qwen1.5-7b": _q(vocab_size=151936, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008),
    "qwen1.5-14b": _q(vocab_size=152064, hidden_size=5120, num_layers=40, num_heads=40, ffn_hidden_size=13696),
    "qwen1.5-32b": _q(vocab_size=152064, hidden_size=5120, num_layers=64, num_heads=40, num_kv_heads=8,
                      ffn_hidden_size=27392),
    "qwen1.5-72b": _q(vocab_size=152064, hidden_size=8192, num_layers=80, num_heads=64, ffn_hidden_size=24576),
}

FAMILIES = (
    Family(name="qwen2", hf_model_types=("qwen2",), hf_architecture="Qwen2ForCausalLM",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=LLAMA_NAMES,
           chat_template="chatml", presets=types.MappingProxyType(PRESETS)),
)
