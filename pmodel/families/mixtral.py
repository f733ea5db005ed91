"""Mixtral (model_type ``mixtral``): the Mistral decoder with a sparse mixture-of-experts MLP.

The decoder is the shared one with ``ModelConfig.num_experts`` set (top-2 of 8 SwiGLU experts,
router softmax then top-k renormalised); this module holds the presets, the HF config mapping and
the checkpoint layout. On disk (safetensors, as Mistral AI publishes it and as transformers 5
writes it back through its conversion mapping) every expert has its own keys
``block_sparse_moe.experts.{j}.w1`` (gate) / ``w3`` (up) / ``w2`` (down) and the router is
``block_sparse_moe.gate``; transformers 5 fuses the experts in memory only.
"""
from __future__ import annotations

import types

from ..model import ModelConfig
from . import Family, Map, _hf
from .llama import LLAMA_NAMES

MIXTRAL_NAMES = tuple(n for n in LLAMA_NAMES if ".mlp." not in n[0]) + (
    Map("layers.{i}.mlp.router", "model.layers.{i}.block_sparse_moe.gate"),
    Map("layers.{i}.mlp.experts.gate_proj", "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight", experts=True),
    Map("layers.{i}.mlp.experts.up_proj", "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight", experts=True),
    Map("layers.{i}.mlp.experts.down_proj", "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight", experts=True),
)


# PEFT adapters on the experts (peft >= 0.17 ``target_parameters``): transformers 5 holds each
# layer's experts as one module ``model.layers.{i}.mlp.experts`` with the fused parameters
# ``gate_up_proj`` (E, 2F, D) (gate rows then up rows) and ``down_proj`` (E, D, F), in this order;
# PEFT wraps every targeted parameter in a ``ParamWrapper`` (one ``lora_A`` (E*r, in) and
# ``lora_B`` (out, r*E) per parameter, see pmodel.checkpoint.peft). pmodel parts per parameter.
PEFT_EXPERTS = ("model.layers.{i}.mlp.experts",
                (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))))


def config_from_hf(d: dict) -> ModelConfig:
    """MixtralConfig dict -> ModelConfig.

    The load-balancing coefficient is ``router_aux_loss_coef`` when ``output_router_logits`` is
    true, else 0: transformers adds the auxiliary loss only then, and pmodel's loss equals
    transformers' for the same config.
    """
    _hf.unsupported(d, "MixtralForCausalLM", router_jitter_noise=lambda v: not v, hidden_act=("silu", "swish"))
    theta, scaling = _hf.rope(d, default_theta=1e6)
    heads = d["num_attention_heads"]
    coef = float(d.get("router_aux_loss_coef", 0.001)) if d.get("output_router_logits") else 0.0
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, ffn_hidden_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 4096 * 32), norm_eps=d.get("rms_norm_eps", 1e-5),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=d.get("sliding_window"), init_std=d.get("initializer_range", 0.02), dtype=_hf.dtype(d),
        num_experts=d.get("num_local_experts", 8), moe_top_k=d.get("num_experts_per_tok", 2),
        moe_aux_loss_coeff=coef, moe_aux_loss_type="pooled",
    )


def config_to_hf(c: ModelConfig) -> dict:
    arch = "MixtralForCausalLM"
    _hf.require(c, arch, norm="rms", norm_offset=0.0, position="rope", rotary_fraction=1.0, rope_interleaved=False,
                qkv_bias=False, o_bias=False, mlp_bias=False, activation="swiglu", embedding_scale=None,
                embedding_norm=False, head_norm=False, num_experts=lambda e: e > 0,
                moe_ffn_hidden_size=lambda f: f == c.ffn_hidden_size, moe_capacity_factor=None,
                moe_z_loss_coeff=0.0, moe_shared_expert_ffn=0,
                moe_aux_loss_type=lambda t: t == "pooled" or not c.moe_aux_loss_coeff)
    if c.padded_vocab_size != c.vocab_size:
        raise ValueError(f"{arch} cannot express these ModelConfig settings: pad_vocab_to")
    return {
        "architectures": [arch], "model_type": "mixtral", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "initializer_range": c.init_std,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings, "sliding_window": c.sliding_window,
        "attention_dropout": 0.0, "num_local_experts": c.num_experts, "num_experts_per_tok": c.moe_top_k,
        "output_router_logits": bool(c.moe_aux_loss_coeff), "router_jitter_noise": 0.0,
        "router_aux_loss_coef": c.moe_aux_loss_coeff if c.moe_aux_loss_coeff else 0.02,
        "torch_dtype": _hf.dtype_name(c.dtype), "dtype": _hf.dtype_name(c.dtype), "use_cache": True,
        **_hf.rope_to_hf(c.rope_theta, c.rope_scaling_dict),
    }


PRESETS = {
    # mistralai/Mixtral-8x7B-v0.1 config.json (sliding_window: null); the aux-loss coefficient
    # 0.02 is the config's router_aux_loss_coef and ModelLink's --moe-aux-loss-coeff for Mixtral.
    "mixtral-8x7b": ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                                ffn_hidden_size=14336, max_position_embeddings=32768, norm_eps=1e-5,
                                rope_theta=1e6, num_experts=8, moe_top_k=2, moe_aux_loss_coeff=0.02),
    # mistralai/Mixtral-8x22B-v0.1 config.json
    "mixtral-8x22b": ModelConfig(vocab_size=32768, hidden_size=6144, num_layers=56, num_heads=48, num_kv_heads=8,
                                 ffn_hidden_size=16384, max_position_embeddings=65536, norm_eps=1e-5,
                                 rope_theta=1e6, num_experts=8, moe_top_k=2, moe_aux_loss_coeff=0.001),
}

FAMILIES = (
    Family(name="mixtral", hf_model_types=("mixtral",), hf_architecture="MixtralForCausalLM",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=MIXTRAL_NAMES,
           chat_template="mistral", presets=types.MappingProxyType(PRESETS),
           reference="transformers MixtralForCausalLM (tests/test_moe_hf.py)"),
)
