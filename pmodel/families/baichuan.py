"""Baichuan and Baichuan2 (HF ``baichuan`` remote code): the LLaMA decoder with q, k, v fused as
``W_pack`` (rows q | k | v); RoPE on the 7B models, ALiBi on the 13B models; Baichuan2's
``NormHead`` L2-normalises every output row (``ModelConfig.head_norm``).

The checkpoints do not say which variant they are (all are ``model_type: baichuan``); as vLLM
does, pmodel reads RoPE for ``hidden_size == 4096`` (the 7B models) and ALiBi otherwise, and
NormHead for Baichuan2's vocabulary of 125696. pmodel's own exports also write
``position_embedding_type`` and ``norm_head`` (extra keys the reference configs ignore), which
take precedence, so any size round-trips.
"""
from __future__ import annotations

import types

from ..model import ModelConfig
from . import Family, _hf
from .tensors import Map

NAMES = (
    Map("embed", "model.embed_tokens"),
    Map("layers.{i}.input_norm", "model.layers.{i}.input_layernorm"),
    Map(("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj"),
        "model.layers.{i}.self_attn.W_pack"),
    Map("layers.{i}.attn.o_proj", "model.layers.{i}.self_attn.o_proj"),
    Map("layers.{i}.post_attn_norm", "model.layers.{i}.post_attention_layernorm"),
    Map("layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj"),
    Map("layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj"),
    Map("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj"),
    Map("final_norm", "model.norm"),
    Map("lm_head", "lm_head"),
)

BAICHUAN2_VOCAB = 125696


def config_from_hf(d: dict) -> ModelConfig:
    """Baichuan / Baichuan2 config dict -> ModelConfig."""
    _hf.unsupported(d, "BaichuanForCausalLM", hidden_act=("silu", "swish"))
    pos = d.get("position_embedding_type") or ("rope" if d["hidden_size"] == 4096 else "alibi")
    norm_head = d.get("norm_head", d["vocab_size"] == BAICHUAN2_VOCAB)
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], ffn_hidden_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings") or d.get("model_max_length", 4096),
        norm_eps=d.get("rms_norm_eps", 1e-6), position=pos, head_norm=bool(norm_head),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), init_std=d.get("initializer_range", 0.02),
        dtype=_hf.dtype(d),
    )


def config_to_hf(c: ModelConfig) -> dict:
    _hf.require(c, "BaichuanForCausalLM", norm="rms", norm_offset=0.0,
                position=lambda p: p in ("rope", "alibi"), rope_theta=10000.0, rope_scaling=None,
                rotary_fraction=1.0, rope_interleaved=False, activation="swiglu", qkv_bias=False, o_bias=False,
                mlp_bias=False, num_kv_heads=c.num_heads, head_dim=c.hidden_size // c.num_heads,
                embedding_scale=None, embedding_norm=False, sliding_window=None, tie_embeddings=False)
    v1_7b = c.position == "rope" and not c.head_norm
    arch = "BaiChuanForCausalLM" if v1_7b else "BaichuanForCausalLM"
    cfg_cls = "BaiChuanConfig" if v1_7b else "BaichuanConfig"
    return {
        "architectures": [arch], "model_type": "baichuan",
        "auto_map": {"AutoConfig": f"configuration_baichuan.{cfg_cls}",
                     "AutoModelForCausalLM": f"modeling_baichuan.{arch}"},
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "model_max_length": c.max_position_embeddings,
        "initializer_range": c.init_std, "rms_norm_eps": c.norm_eps, "tie_word_embeddings": False,
        "position_embedding_type": c.position, "norm_head": c.head_norm,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": _hf.dtype_name(c.dtype), "use_cache": True,
    }


def _b(**kw) -> ModelConfig:
    base = dict(vocab_size=64000, norm_eps=1e-6, max_position_embeddings=4096)
    return ModelConfig(**{**base, **kw})


PRESETS = {
    # baichuan-inc/Baichuan-7B config.json (= the defaults of its configuration_baichuan.py)
    "baichuan-7b": _b(hidden_size=4096, num_layers=32, num_heads=32, ffn_hidden_size=11008),
    # baichuan-inc/Baichuan-13B-Base config.json (reference_code/baichuan_13b_v1/config.json)
    "baichuan-13b": _b(hidden_size=5120, num_layers=40, num_heads=40, ffn_hidden_size=13696, position="alibi"),
    # baichuan-inc/Baichuan2-7B-Base config.json: Baichuan-7B's widths, vocabulary 125696, NormHead
    "baichuan2-7b": _b(vocab_size=BAICHUAN2_VOCAB, hidden_size=4096, num_layers=32, num_heads=32,
                       ffn_hidden_size=11008, head_norm=True),
    # baichuan-inc/Baichuan2-13B config.json (reference_code/baichuan2_13b/config.json)
    "baichuan2-13b": _b(vocab_size=BAICHUAN2_VOCAB, hidden_size=5120, num_layers=40, num_heads=40,
                        ffn_hidden_size=13696, position="alibi", head_norm=True),
}

FAMILIES = (
    Family(name="baichuan", hf_model_types=("baichuan",), hf_architecture="BaichuanForCausalLM",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=NAMES,
           # Baichuan2's role ids; Baichuan-13B-Chat (v1 vocabulary) needs template "baichuan"
           # (rendering checks the ids and says so).
           chat_template="baichuan2", presets=types.MappingProxyType(PRESETS),
           reference="Baichuan / Baichuan2 remote code (modeling_baichuan.py); chatglm.cpp fixtures"),
)
