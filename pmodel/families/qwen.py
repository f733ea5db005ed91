"""Qwen (v1, HF ``qwen`` remote code): the LLaMA decoder with q, k, v fused as ``c_attn`` (rows
q | k | v, with bias), the MLP halves swapped (``w2`` is the gate and ``w1`` the up projection:
``w1(x) * silu(w2(x))``) and ``intermediate_size / 2`` as the FFN width.

``use_dynamic_ntk`` and ``use_logn_attn`` change the model only past ``seq_length`` (and only
at inference); pmodel implements neither, so a checkpoint that enables them loads with
``position_limit = seq_length`` and longer inputs are refused with the reason.
"""
from __future__ import annotations

import types

import torch

from ..model import ModelConfig
from . import Family, _hf
from .tensors import Map

NAMES = (
    Map("embed", "transformer.wte"),
    Map("layers.{i}.input_norm", "transformer.h.{i}.ln_1"),
    Map(("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj"),
        "transformer.h.{i}.attn.c_attn"),
    Map("layers.{i}.attn.o_proj", "transformer.h.{i}.attn.c_proj"),
    Map("layers.{i}.post_attn_norm", "transformer.h.{i}.ln_2"),
    Map("layers.{i}.mlp.gate_proj", "transformer.h.{i}.mlp.w2"),
    Map("layers.{i}.mlp.up_proj", "transformer.h.{i}.mlp.w1"),
    Map("layers.{i}.mlp.down_proj", "transformer.h.{i}.mlp.c_proj"),
    Map("final_norm", "transformer.ln_f"),
    Map("lm_head", "lm_head"),
)


def config_from_hf(d: dict) -> ModelConfig:
    """QWenConfig dict -> ModelConfig."""
    _hf.unsupported(d, "QWenLMHeadModel", scale_attn_weights=True, use_cache_quantization=False)
    heads, D = d["num_attention_heads"], d["hidden_size"]
    seq = d.get("seq_length", 8192)
    limit = seq if (d.get("use_dynamic_ntk") or d.get("use_logn_attn")) else None
    bias = not d.get("no_bias", True)
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=D, num_layers=d["num_hidden_layers"], num_heads=heads,
        head_dim=d.get("kv_channels") or D // heads, ffn_hidden_size=d["intermediate_size"] // 2,
        max_position_embeddings=seq, position_limit=limit, norm_eps=d.get("layer_norm_epsilon", 1e-6),
        rope_theta=float(d.get("rotary_emb_base", 10000)), rotary_fraction=float(d.get("rotary_pct", 1.0)),
        qkv_bias=True, o_bias=bias, mlp_bias=bias, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        init_std=d.get("initializer_range", 0.02), dtype=_hf.dtype(d),
    )


def config_to_hf(c: ModelConfig) -> dict:
    _hf.require(c, "QWenLMHeadModel", norm="rms", norm_offset=0.0, position="rope", rope_scaling=None,
                rope_interleaved=False, activation="swiglu", qkv_bias=True, mlp_bias=c.o_bias,
                num_kv_heads=c.num_heads, embedding_scale=None, embedding_norm=False, sliding_window=None,
                position_limit=lambda v: v in (None, c.max_position_embeddings))
    ntk = c.position_limit is not None
    return {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": 2 * c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "kv_channels": c.head_dim,
        "rotary_pct": c.rotary_fraction, "rotary_emb_base": c.rope_theta, "seq_length": c.max_position_embeddings,
        "max_position_embeddings": c.max_position_embeddings, "layer_norm_epsilon": c.norm_eps,
        "initializer_range": c.init_std, "no_bias": not c.o_bias, "scale_attn_weights": True,
        "use_dynamic_ntk": ntk, "use_logn_attn": ntk, "use_flash_attn": False, "emb_dropout_prob": 0.0,
        "attn_dropout_prob": 0.0, "tie_word_embeddings": c.tie_embeddings,
        "bf16": c.dtype == torch.bfloat16, "fp16": c.dtype == torch.float16, "fp32": c.dtype == torch.float32,
        "torch_dtype": _hf.dtype_name(c.dtype), "use_cache": True,
    }


def _q(**kw) -> ModelConfig:
    base = dict(norm_eps=1e-6, qkv_bias=True, vocab_size=152064)
    return ModelConfig(**{**base, **kw})


PRESETS = {
    # Qwen/Qwen-7B config.json (reference_code/qwen/config.json): FFN = intermediate_size / 2,
    # max positions = seq_length 8192.
    "qwen-7b": _q(vocab_size=151936, hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008,
                  max_position_embeddings=8192),
    # ModelLink examples/qwen/pretrain_qwen_14b_ptd.sh (40 layers, hidden 5120, FFN 13696, 40 heads,
    # --max-position-embeddings 8192, q/k/v bias, untied); vocabulary 152064 of Qwen/Qwen-14B.
    "qwen-14b": _q(hidden_size=5120, num_layers=40, num_heads=40, ffn_hidden_size=13696,
                   max_position_embeddings=8192),
    # ModelLink examples/qwen/pretrain_qwen_72b_ptd.sh (80 layers, hidden 8192, FFN 24576, 64 heads,
    # --max-position-embeddings 32768, --rotary-base 1000000); vocabulary 152064 of Qwen/Qwen-72B.
    "qwen-72b": _q(hidden_size=8192, num_layers=80, num_heads=64, ffn_hidden_size=24576,
                   max_position_embeddings=32768, rope_theta=1000000.0),
}

FAMILIES = (
    Family(name="qwen", hf_model_types=("qwen",), hf_architecture="QWenLMHeadModel",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=NAMES, chat_template="qwen",
           presets=types.MappingProxyType(PRESETS), reference="Qwen remote code (modeling_qwen.py)"),
)
