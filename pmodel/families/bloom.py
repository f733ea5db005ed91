"""Bloom (HF ``bloom``): ALiBi, a LayerNorm after the embedding, LayerNorm with bias, tanh GeLU
MLP (4x), biases on every linear, tied embeddings. The checkpoint's ``query_key_value`` holds
q, k, v interleaved per head (``[q_h, k_h, v_h]`` for each head h: ``groups="heads"``).
"""
from __future__ import annotations

import types

from ..model import ModelConfig
from . import Family, _hf
from .tensors import Map

NAMES = (
    Map("embed", "transformer.word_embeddings"),
    Map("embed_norm", "transformer.word_embeddings_layernorm"),
    Map("layers.{i}.input_norm", "transformer.h.{i}.input_layernorm"),
    Map(("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj"),
        "transformer.h.{i}.self_attention.query_key_value", groups="heads"),
    Map("layers.{i}.attn.o_proj", "transformer.h.{i}.self_attention.dense"),
    Map("layers.{i}.post_attn_norm", "transformer.h.{i}.post_attention_layernorm"),
    Map("layers.{i}.mlp.up_proj", "transformer.h.{i}.mlp.dense_h_to_4h"),
    Map("layers.{i}.mlp.down_proj", "transformer.h.{i}.mlp.dense_4h_to_h"),
    Map("final_norm", "transformer.ln_f"),
    Map("lm_head", "lm_head"),
)


def config_from_hf(d: dict) -> ModelConfig:
    """BloomConfig dict -> ModelConfig."""
    _hf.unsupported(d, "BloomForCausalLM", apply_residual_connection_post_layernorm=False,
                    slow_but_exact=False)
    D = d.get("hidden_size") or d["n_embed"]
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=D, num_layers=d.get("n_layer") or d["num_hidden_layers"],
        num_heads=d.get("n_head") or d["num_attention_heads"], ffn_hidden_size=4 * D,
        max_position_embeddings=d.get("seq_length", 2048), norm="layer",
        norm_eps=d.get("layer_norm_epsilon", 1e-5), position="alibi", qkv_bias=True, o_bias=True,
        mlp_bias=True, activation="gelu", tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        embedding_norm=True, init_std=d.get("initializer_range", 0.02), dtype=_hf.dtype(d),
    )


def config_to_hf(c: ModelConfig) -> dict:
    _hf.require(c, "BloomForCausalLM", norm="layer", position="alibi", qkv_bias=True, o_bias=True,
                mlp_bias=True, activation="gelu", embedding_norm=True, ffn_hidden_size=4 * c.hidden_size,
                num_kv_heads=c.num_heads, head_dim=c.hidden_size // c.num_heads, embedding_scale=None,
                norm_offset=0.0, sliding_window=None)
    return {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads,
        "layer_norm_epsilon": c.norm_eps, "initializer_range": c.init_std, "seq_length": c.max_position_embeddings,
        "apply_residual_connection_post_layernorm": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "pretraining_tp": 1, "slow_but_exact": False, "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
        "torch_dtype": _hf.dtype_name(c.dtype), "dtype": _hf.dtype_name(c.dtype), "use_cache": True,
    }


def _bloom(**kw) -> ModelConfig:
    base = dict(vocab_size=250880, norm="layer", norm_eps=1e-5, position="alibi", qkv_bias=True, o_bias=True,
                mlp_bias=True, activation="gelu", tie_embeddings=True, embedding_norm=True,
                max_position_embeddings=2048)
    return ModelConfig(**{**base, **kw})


# bigscience/bloom-7b1 and bigscience/bloom config.json (hidden_size, n_layer, n_head, vocab_size
# 250880, layer_norm_epsilon 1e-5); FFN 4 x hidden (BloomMLP); 2048 = the training sequence
# length (BigScience, "BLOOM", arXiv:2211.05100, Table 3); ALiBi itself has no position limit.
PRESETS = {
    "bloom-7b1": _bloom(hidden_size=4096, num_layers=30, num_heads=32, ffn_hidden_size=16384),
    "bloom-176b": _bloom(hidden_size=14336, num_layers=70, num_heads=112, ffn_hidden_size=57344),
}

FAMILIES = (
    Family(name="bloom", hf_model_types=("bloom",), hf_architecture="BloomForCausalLM",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=NAMES,
           presets=types.MappingProxyType(PRESETS), reference="transformers BloomForCausalLM"),
)
