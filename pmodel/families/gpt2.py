"""GPT-3 (the Megatron GPT architecture) with Hugging Face interop through the GPT-2 layout.

Learned positions, pre-LayerNorm with biases, a GeLU MLP (4x), biases on every linear, tied
embeddings. The GPT-2 checkpoint (``GPT2LMHeadModel``) stores every linear as a ``Conv1D``
(``[in, out]``, so ``transpose=True``) and q, k, v fused as ``c_attn`` (rows q | k | v).
"""
from __future__ import annotations

import types

from ..model import ModelConfig
from . import Family, _hf
from .tensors import Map

NAMES = (
    Map("embed", "transformer.wte"),
    Map("pos_embed", "transformer.wpe"),
    Map("layers.{i}.input_norm", "transformer.h.{i}.ln_1"),
    Map(("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj"),
        "transformer.h.{i}.attn.c_attn", transpose=True),
    Map("layers.{i}.attn.o_proj", "transformer.h.{i}.attn.c_proj", transpose=True),
    Map("layers.{i}.post_attn_norm", "transformer.h.{i}.ln_2"),
    Map("layers.{i}.mlp.up_proj", "transformer.h.{i}.mlp.c_fc", transpose=True),
    Map("layers.{i}.mlp.down_proj", "transformer.h.{i}.mlp.c_proj", transpose=True),
    Map("final_norm", "transformer.ln_f"),
    Map("lm_head", "lm_head"),
)

# HF activation_function -> pmodel activation ("gelu" = tanh approximation, "gelu_exact" = erf).
_ACT = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "gelu": "gelu_exact"}


def config_from_hf(d: dict) -> ModelConfig:
    """GPT2Config dict -> ModelConfig."""
    _hf.unsupported(d, "GPT2LMHeadModel", activation_function=tuple(_ACT), scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    D = d["n_embd"]
    return ModelConfig(
        vocab_size=d["vocab_size"], hidden_size=D, num_layers=d["n_layer"], num_heads=d["n_head"],
        ffn_hidden_size=d.get("n_inner") or 4 * D, max_position_embeddings=d.get("n_positions", 1024),
        norm="layer", norm_eps=d.get("layer_norm_epsilon", 1e-5), position="learned",
        qkv_bias=True, o_bias=True, mlp_bias=True, activation=_ACT[d.get("activation_function", "gelu_new")],
        tie_embeddings=bool(d.get("tie_word_embeddings", True)), init_std=d.get("initializer_range", 0.02),
        pad_vocab_to=int(d.get("make_vocab_size_divisible_by", 1)), dtype=_hf.dtype(d),
    )


def config_to_hf(c: ModelConfig) -> dict:
    _hf.require(c, "GPT2LMHeadModel", norm="layer", position="learned", qkv_bias=True, o_bias=True,
                mlp_bias=True, activation=lambda a: a in ("gelu", "gelu_exact"), norm_offset=0.0,
                num_kv_heads=c.num_heads, head_dim=c.hidden_size // c.num_heads, embedding_scale=None,
                embedding_norm=False, sliding_window=None)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": c.num_heads, "n_inner": c.ffn_hidden_size,
        "n_positions": c.max_position_embeddings, "n_ctx": c.max_position_embeddings,
        "layer_norm_epsilon": c.norm_eps, "initializer_range": c.init_std,
        "activation_function": "gelu_new" if c.activation == "gelu" else "gelu",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "tie_word_embeddings": c.tie_embeddings, "bos_token_id": 50256, "eos_token_id": 50256,
        # Megatron's name; transformers ignores it (the file holds vocab_size rows), pmodel pads on load.
        "make_vocab_size_divisible_by": c.pad_vocab_to,
        "torch_dtype": _hf.dtype_name(c.dtype), "dtype": _hf.dtype_name(c.dtype), "use_cache": True,
    }


def _gpt(**kw) -> ModelConfig:
    base = dict(norm="layer", norm_eps=1e-5, position="learned", qkv_bias=True, o_bias=True, mlp_bias=True,
                tie_embeddings=True)
    return ModelConfig(**{**base, **kw})


PRESETS = {
    # GPT-3 175B: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1
    # (n_layers 96, d_model 12288, n_heads 96, d_head 128, n_ctx 2048; d_ff = 4 d_model, Sec. 2.1);
    # the GPT-2 BPE vocabulary (50257) padded to a multiple of 128 as Megatron-LM's
    # --make-vocab-size-divisible-by default; Megatron's GPT defaults: erf GeLU, LayerNorm eps 1e-5.
    "gpt3-175b": _gpt(vocab_size=50257, pad_vocab_to=128, hidden_size=12288, num_layers=96, num_heads=96,
                      ffn_hidden_size=49152, max_position_embeddings=2048, activation="gelu_exact"),
    # openai-community/gpt2 config.json (GPT-2 small, 124M): the HF interop reference size.
    "gpt2": _gpt(vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072,
                 max_position_embeddings=1024, activation="gelu"),
}

FAMILIES = (
    Family(name="gpt", hf_model_types=("gpt2",), hf_architecture="GPT2LMHeadModel",
           config_from_hf=config_from_hf, config_to_hf=config_to_hf, names=NAMES,
           presets=types.MappingProxyType(PRESETS), ignore_hf_keys=(".attn.bias", ".attn.masked_bias"),
           reference="transformers GPT2LMHeadModel"),
)
