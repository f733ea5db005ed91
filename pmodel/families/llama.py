"""LLaMA-architecture families: LLaMA 1/2/3, CodeLlama, Yi, Aquila/Aquila2 (model_type llama)
and Mistral (the same decoder with a sliding window).

Preset hyperparameters are the published HF ``config.json`` values of the official
checkpoints; the source repository is named beside each preset.
"""
from __future__ import annotations

import types

from ..model import ModelConfig
from . import Family, _hf

LLAMA_NAMES = (
    ("embed", "model.embed_tokens"),
    ("layers.{i}.input_norm", "model.layers.{i}.input_layernorm"),
    ("layers.{i}.attn.q_proj", "model.layers.{i}.self_attn.q_proj"),
    ("layers.{i}.attn.k_proj", "model.layers.{i}.self_attn.k_proj"),
    ("layers.{i}.attn.v_proj", "model.layers.{i}.self_attn.v_proj"),
    ("layers.{i}.attn.o_proj", "model.layers.{i}.self_attn.o_proj"),
    ("layers.{i}.post_attn_norm", "model.layers.{i}.post_attention_layernorm"),
    ("layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj"),
    ("layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj"),
    ("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj"),
    ("final_norm", "model.norm"),
    ("lm_head", "lm_head"),
)


def config_from_hf(d: dict) -> ModelConfig:
    """LlamaConfig / MistralConfig dict -> ModelConfig."""
    theta, scaling = _hf.rope(d)
    heads = d["num_attention_heads"]
    bias = bool(d.get("attention_bias", False))
    window = d.get("sliding_window") if d.get("model_type") == "mistral" else None
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, ffn_hidden_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 2048), norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, qkv_bias=bias, o_bias=bias,
        mlp_bias=bool(d.get("mlp_bias", False)), activation=_hf.activation(d.get("hidden_act", "silu")),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), sliding_window=window,
        init_std=d.get("initializer_range", 0.02), dtype=_hf.dtype(d),
    )


def _check_exportable(c: ModelConfig, arch: str) -> None:
    unsupported = {
        "norm": c.norm != "rms", "norm_offset": bool(c.norm_offset), "position": c.position != "rope",
        "rotary_fraction": c.rotary_fraction != 1.0, "rope_interleaved": c.rope_interleaved,
        "qkv_bias != o_bias": c.qkv_bias != c.o_bias, "embedding_scale": c.embedding_scale is not None,
        "embedding_norm": c.embedding_norm, "activation": c.activation != "swiglu",
        "pad_vocab_to": c.padded_vocab_size != c.vocab_size,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{arch} cannot express these ModelConfig settings: {bad}")


def config_to_hf(c: ModelConfig, *, model_type: str = "llama", arch: str = "LlamaForCausalLM") -> dict:
    _check_exportable(c, arch)
    if model_type == "llama" and c.sliding_window is not None:
        raise ValueError("LlamaForCausalLM has no sliding window; export as the mistral family")
    d = {
        "architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": c.qkv_bias, "attention_dropout": 0.0, "mlp_bias": c.mlp_bias,
        "torch_dtype": _hf.dtype_name(c.dtype), "dtype": _hf.dtype_name(c.dtype), "use_cache": True,
        **_hf.rope_to_hf(c.rope_theta, c.rope_scaling_dict),
    }
    if model_type == "mistral":
        d["sliding_window"] = c.sliding_window
        d.pop("mlp_bias")
    return d


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**kw)


_L1 = dict(vocab_size=32000, max_position_embeddings=2048, norm_eps=1e-6)
_L2 = dict(vocab_size=32000, max_position_embeddings=4096, norm_eps=1e-5)
_L3 = dict(vocab_size=128256, max_position_embeddings=8192, norm_eps=1e-5, rope_theta=500000.0)

PRESETS = {
    # Tiny config for tests and the demo (not a published model).
    "debug": _cfg(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  ffn_hidden_size=172, max_position_embeddings=256),
    # huggyllama/llama-{7b,13b,30b,65b} config.json
    "llama-7b": _cfg(hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008, **_L1),
    "llama-13b": _cfg(hidden_size=5120, num_layers=40, num_heads=40, ffn_hidden_size=13824, **_L1),
    "llama-33b": _cfg(hidden_size=6656, num_layers=60, num_heads=52, ffn_hidden_size=17920, **_L1),
    "llama-65b": _cfg(hidden_size=8192, num_layers=80, num_heads=64, ffn_hidden_size=22016,
                      **{**_L1, "norm_eps": 1e-5}),
    # meta-llama/Llama-2-{7b,13b,70b}-hf config.json
    "llama2-7b": _cfg(hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008, **_L2),
    "llama2-13b": _cfg(hidden_size=5120, num_layers=40, num_heads=40, ffn_hidden_size=13824, **_L2),
    # Llama-2-34B was described (Touvron et al. 2023, Table 1) but never released; its
    # architecture is CodeLlama-34B's (below) at Llama-2's 4096 context and theta 10000.
    "llama2-34b": _cfg(hidden_size=8192, num_layers=48, num_heads=64, num_kv_heads=8,
                       ffn_hidden_size=22016, **_L2),
    "llama2-70b": _cfg(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                       ffn_hidden_size=28672, **_L2),
    # meta-llama/Meta-Llama-3-{8B,70B} config.json
    "llama3-8b": _cfg(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      ffn_hidden_size=14336, **_L3),
    "llama3-70b": _cfg(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                       ffn_hidden_size=28672, **_L3),
    # codellama/CodeLlama-34b-hf config.json
    "codellama-34b": _cfg(vocab_size=32000, hidden_size=8192, num_layers=48, num_heads=64, num_kv_heads=8,
                          ffn_hidden_size=22016, max_position_embeddings=16384, norm_eps=1e-5,
                          rope_theta=1000000.0),
    # 01-ai/Yi-34B config.json
    "yi-34b": _cfg(vocab_size=64000, hidden_size=7168, num_layers=60, num_heads=56, num_kv_heads=8,
                   ffn_hidden_size=20480, max_position_embeddings=4096, norm_eps=1e-5, rope_theta=5000000.0),
    # BAAI/Aquila-7B, BAAI/Aquila2-7B, BAAI/Aquila2-34B config.json
    "aquila-7b": _cfg(vocab_size=100008, hidden_size=4096, num_layers=32, num_heads=32,
                      ffn_hidden_size=11008, max_position_embeddings=2048, norm_eps=1e-6),
    "aquila2-7b": _cfg(vocab_size=100008, hidden_size=4096, num_layers=32, num_heads=32,
                       ffn_hidden_size=11008, max_position_embeddings=2048, norm_eps=1e-5),
    "aquila2-34b": _cfg(vocab_size=100008, hidden_size=6144, num_layers=60, num_heads=48, num_kv_heads=8,
                        ffn_hidden_size=24576, max_position_embeddings=4096, norm_eps=1e-5),
}

MISTRAL_PRESETS = {
    # mistralai/Mistral-7B-v0.1 config.json
    "mistral-7b": _cfg(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       ffn_hidden_size=14336, max_position_embeddings=32768, norm_eps=1e-5,
                       rope_theta=10000.0, sliding_window=4096),
}

FAMILIES = (
    Family(name="llama", hf_model_types=("llama", "aquila"), hf_architecture="LlamaForCausalLM",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=LLAMA_NAMES,
           chat_template="llama2", presets=types.MappingProxyType(PRESETS)),
    Family(name="mistral", hf_model_types=("mistral",), hf_architecture="MistralForCausalLM",
           config_from_hf=config_from_hf,
           config_to_hf=lambda c: config_to_hf(c, model_type="mistral", arch="MistralForCausalLM"),
           names=LLAMA_NAMES, chat_template="mistral", presets=types.MappingProxyType(MISTRAL_PRESETS)),
)
