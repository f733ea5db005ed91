"""ChatGLM3 (HF ``chatglm`` remote code; ChatGLM2 has the same layout): RMSNorm, rotary on the
first half of each head with interleaved pairs, multi-query groups, q/k/v bias, SwiGLU. The
checkpoint fuses q, k, v as ``query_key_value`` (rows q | k | v, k and v one head per group)
and gate, up as ``dense_h_to_4h`` (rows gate | up); the vocabulary is stored padded
(``padded_vocab_size``, the logits width).
"""
from __future__ import annotations

import types

from ..model import ModelConfig
from . import Family, _hf
from .tensors import Map

NAMES = (
    Map("embed", "transformer.embedding.word_embeddings"),
    Map("layers.{i}.input_norm", "transformer.encoder.layers.{i}.input_layernorm"),
    Map(("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj"),
        "transformer.encoder.layers.{i}.self_attention.query_key_value"),
    Map("layers.{i}.attn.o_proj", "transformer.encoder.layers.{i}.self_attention.dense"),
    Map("layers.{i}.post_attn_norm", "transformer.encoder.layers.{i}.post_attention_layernorm"),
    Map(("layers.{i}.mlp.gate_proj", "layers.{i}.mlp.up_proj"), "transformer.encoder.layers.{i}.mlp.dense_h_to_4h"),
    Map("layers.{i}.mlp.down_proj", "transformer.encoder.layers.{i}.mlp.dense_4h_to_h"),
    Map("final_norm", "transformer.encoder.final_layernorm"),
    Map("lm_head", "transformer.output_layer"),
)


def config_from_hf(d: dict) -> ModelConfig:
    """ChatGLMConfig dict -> ModelConfig."""
    _hf.unsupported(d, "ChatGLMForConditionalGeneration", apply_residual_connection_post_layernorm=False,
                    post_layer_norm=True, pre_seq_len=lambda v: v is None, rope_ratio=lambda v: v in (None, 1, 1.0),
                    original_rope=True, fp32_residual_connection=False)
    heads, D = d["num_attention_heads"], d["hidden_size"]
    bias = bool(d.get("add_bias_linear", False))
    return ModelConfig(
        vocab_size=d["padded_vocab_size"], hidden_size=D, num_layers=d["num_layers"], num_heads=heads,
        num_kv_heads=d["multi_query_group_num"] if d.get("multi_query_attention") else heads,
        head_dim=d.get("kv_channels") or D // heads, ffn_hidden_size=d["ffn_hidden_size"],
        max_position_embeddings=d.get("seq_length", 2048), norm="rms" if d.get("rmsnorm", True) else "layer",
        norm_eps=d.get("layernorm_epsilon", 1e-5), rotary_fraction=0.5, rope_interleaved=True,
        qkv_bias=bias or bool(d.get("add_qkv_bias", False)), o_bias=bias, mlp_bias=bias,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), dtype=_hf.dtype(d),
    )


def config_to_hf(c: ModelConfig) -> dict:
    _hf.require(c, "ChatGLMForConditionalGeneration", norm_offset=0.0, position="rope", rope_theta=10000.0,
                rope_scaling=None, rotary_fraction=0.5, rope_interleaved=True, activation="swiglu",
                mlp_bias=c.o_bias, qkv_bias=lambda v: v or not c.o_bias, embedding_scale=None,
                embedding_norm=False, sliding_window=None, tie_embeddings=False)
    return {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "padded_vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size,
        "num_layers": c.num_layers, "num_attention_heads": c.num_heads, "kv_channels": c.head_dim,
        "multi_query_attention": c.num_kv_heads != c.num_heads, "multi_query_group_num": c.num_kv_heads,
        "seq_length": c.max_position_embeddings, "layernorm_epsilon": c.norm_eps, "rmsnorm": c.norm == "rms",
        "add_bias_linear": c.o_bias, "add_qkv_bias": c.qkv_bias, "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": True, "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True, "original_rope": True, "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": _hf.dtype_name(c.dtype), "use_cache": True,
    }


PRESETS = {
    # THUDM/chatglm3-6b config.json (reference_code/chatglm3/config.json)
    "chatglm3-6b": ModelConfig(vocab_size=65024, hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2,
                               head_dim=128, ffn_hidden_size=13696, max_position_embeddings=8192, norm_eps=1e-5,
                               rotary_fraction=0.5, rope_interleaved=True, qkv_bias=True),
}

FAMILIES = (
    Family(name="chatglm", hf_model_types=("chatglm",), hf_architecture="ChatGLMModel",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=NAMES, chat_template="chatglm3",
           presets=types.MappingProxyType(PRESETS), ignore_hf_keys=("rotary_pos_emb.inv_freq",),
           reference="ChatGLM3 remote code (modeling_chatglm.py); chatglm.cpp fixtures"),
)
