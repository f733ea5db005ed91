"""InternLM (v1, HF ``internlm`` remote code): the LLaMA layout with biases on q, k, v and the
output projection (``config.bias``); rotary base 10000 (the reference code has no theta setting).
"""
from __future__ import annotations

import types

from ..model import ModelConfig
from . import Family, _hf
from .llama import LLAMA_NAMES


def config_from_hf(d: dict) -> ModelConfig:
    """InternLMConfig dict -> ModelConfig."""
    _hf.unsupported(d, "InternLMForCausalLM", hidden_act=("silu", "swish"),
                    rotary=lambda r: not r or r.get("type", "origin") == "origin")
    heads = d["num_attention_heads"]
    bias = bool(d.get("bias", True))
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, ffn_hidden_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 2048), norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float((d.get("rotary") or {}).get("base", 10000)), qkv_bias=bias, o_bias=bias,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), init_std=d.get("initializer_range", 0.02),
        dtype=_hf.dtype(d),
    )


def config_to_hf(c: ModelConfig) -> dict:
    _hf.require(c, "InternLMForCausalLM", norm="rms", norm_offset=0.0, position="rope", rope_theta=10000.0,
                rope_scaling=None, rotary_fraction=1.0, rope_interleaved=False, activation="swiglu",
                qkv_bias=c.o_bias, mlp_bias=False, num_kv_heads=c.num_heads,
                head_dim=c.hidden_size // c.num_heads, embedding_scale=None, embedding_norm=False,
                sliding_window=None)
    return {
        "architectures": ["InternLMForCausalLM"], "model_type": "internlm",
        "auto_map": {"AutoConfig": "configuration_internlm.InternLMConfig",
                     "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM"},
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps, "bias": c.qkv_bias, "tie_word_embeddings": c.tie_embeddings,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": _hf.dtype_name(c.dtype), "use_cache": True,
    }


def _i(**kw) -> ModelConfig:
    base = dict(vocab_size=103168, max_position_embeddings=2048, qkv_bias=True, o_bias=True)
    return ModelConfig(**{**base, **kw})


PRESETS = {
    # internlm/internlm-7b config.json (= the defaults of its configuration_internlm.py)
    "internlm-7b": _i(hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008, norm_eps=1e-6),
    # ModelLink examples/intern/pretrain_internlm_65b_ptd.sh: 80 layers, hidden 8192, FFN 22016,
    # 64 heads, 2048 positions, q/k/v and dense biases, untied; vocabulary of the InternLM
    # tokenizer (103168, --make-vocab-size-divisible-by 1); no --norm-epsilon: Megatron's 1e-5.
    "internlm-65b": _i(hidden_size=8192, num_layers=80, num_heads=64, ffn_hidden_size=22016, norm_eps=1e-5),
}

FAMILIES = (
    Family(name="internlm", hf_model_types=("internlm",), hf_architecture="InternLMForCausalLM",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=LLAMA_NAMES,
           chat_template="internlm", presets=types.MappingProxyType(PRESETS),
           reference="InternLM remote code (modeling_internlm.py); chatglm.cpp fixtures"),
)
