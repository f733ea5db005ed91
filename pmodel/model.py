"""The config-driven decoder and the ``Model`` record.

One decoder covers every family: a frozen :class:`ModelConfig` switches norms, position
encodings, biases, MLP kind, tied embeddings and so on. A :class:`Model` is a record of pure
functions over a params pytree: ``embed``, ``block``, ``head`` and ``head_loss``; transforms
(recompute, LoRA, tensor / pipeline parallel) return a new record with some of them replaced.

Model code reads head counts from the weights it receives (``q_proj`` rows / head_dim), so the
same functions run on full and on sharded weights.

Batch convention (Megatron style): ``labels`` are already shifted: ``labels[:, t]`` is the token
to predict at position ``t``; ``-100`` (``ops.IGNORE_INDEX``) or ``loss_mask == 0`` excludes it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from . import ops
from .ops import Kernels
from .ops.weights import map_rows
from .params import P

__all__ = ["ModelConfig", "Model", "Context", "KVCache", "build", "decoder_defs", "counted_mask", "count_tokens",
           "moe_losses", "moe_stats_zeros", "moe_loss_term", "moe_stats_flatten", "moe_stats_unflatten",
           "MOE_STATS_KEYS"]

_NORMS = ("rms", "layer")
_POSITIONS = ("rope", "alibi", "learned", "none")
_ACTIVATIONS = ("swiglu", "geglu", "gelu", "gelu_exact")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Every architectural switch of the decoder.

    Attributes:
      vocab_size: tokenizer vocabulary (logits are returned at this width).
      hidden_size, num_layers, num_heads, ffn_hidden_size: the usual sizes.
      num_kv_heads: key/value heads (GQA; 1 = MQA); default ``num_heads``.
      head_dim: per-head width; default ``hidden_size // num_heads``.
      max_position_embeddings: context length the model was trained for (learned positions size).
      norm: ``"rms"`` or ``"layer"``; ``norm_eps``; ``norm_offset`` 1.0 for Gemma's ``(1 + w)``.
      position: ``"rope"``, ``"alibi"``, ``"learned"`` or ``"none"``.
      rope_theta, rope_scaling (None or a dict with ``rope_type`` linear / llama3 and its keys),
      rotary_fraction (partial rotary: fraction of head_dim rotated), rope_interleaved
        (pairs (x0, x1) instead of rotate-half).
      qkv_bias, o_bias, mlp_bias: linear biases.
      activation: ``"swiglu"``, ``"geglu"`` (tanh GeLU), ``"gelu"`` (tanh) or ``"gelu_exact"``.
      tie_embeddings: the output layer reuses the embedding matrix.
      embedding_scale: multiply embeddings by this (Gemma: sqrt(hidden_size)); None = off.
      embedding_norm: a LayerNorm right after the embedding (Bloom).
      sliding_window: attention window W (a query sees the W most recent positions); None = off.
      pad_vocab_to: pad the embedding / output rows to a multiple of this (Megatron's
        ``--make-vocab-size-divisible-by``); logits are cut back to ``vocab_size``.
      head_norm: L2-normalise every output-layer row before use, in training and generation
        (Baichuan2's NormHead); the stored weight stays as trained.
      position_limit: refuse a forward whose sequence (cache slots included) exceeds this many
        positions. For a family whose reference changes behaviour past its trained length
        (Qwen's dynamic NTK and log-n attention scaling), which pmodel does not implement.
      init_std: std of the normal init.
      dtype: parameter / activation dtype.
      num_experts: 0 = a dense MLP in every layer; E > 0 = a mixture-of-experts layer instead
        (SwiGLU experts, see :func:`_moe`): router logits in fp32, softmax over the E experts,
        top ``moe_top_k``, the k weights renormalised to sum to one (Mixtral), tokens sorted by
        expert, one grouped computation over all experts, combined with the router weights.
      moe_top_k: experts per token.
      moe_ffn_hidden_size: each expert's width (default ``ffn_hidden_size``).
      moe_capacity_factor: None = dropless (every token reaches its k experts); a float = each
        expert keeps at most ``ceil(N * k / E * factor)`` of the token-expert pairs routed to it in
        a forward over N tokens (Megatron's capacity), chosen by ``moe_drop_policy``.
      moe_drop_policy: ``"probs"`` (keep the pairs with the highest router weight; Megatron's
        default) or ``"position"`` (keep the earliest tokens). Dropped pairs add nothing and the
        kept weights are not renormalised (Megatron).
      moe_aux_loss_coeff: weight of the load-balancing loss added to ``Model.loss``.
      moe_aux_loss_type: ``"pooled"``: the statistics of all layers pooled, as transformers'
        Mixtral computes ``router_aux_loss_coef * load_balancing_loss_func`` (``E * sum_e F_e
        P_e``, F = fraction of the token-expert pairs of all layers at e, P = mean router
        probability over all layers' tokens); ``"per_layer"``: Megatron / ModelLink's
        ``switch_load_balancing_loss_func`` summed over layers (``E / k * sum_e f_e P_e`` per
        layer).
      moe_z_loss_coeff: weight of the router z-loss (``mean logsumexp(logits)^2`` per layer,
        summed over layers; Megatron's ``--moe-z-loss-coeff``).
      moe_router_jitter: multiplicative input noise in training (Switch); only 0 is supported
        (the decoder has no training-mode random stream), anything else is refused.
      moe_shared_expert_ffn: width of an always-on shared SwiGLU expert added to the routed
        output (0 = none; for families with shared experts).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    norm: str = "rms"
    norm_eps: float = 1e-5
    norm_offset: float = 0.0
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    rotary_fraction: float = 1.0
    rope_interleaved: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "swiglu"
    tie_embeddings: bool = False
    embedding_scale: float | None = None
    embedding_norm: bool = False
    sliding_window: int | None = None
    pad_vocab_to: int = 1
    head_norm: bool = False
    position_limit: int | None = None
    init_std: float = 0.02
    dtype: torch.dtype = torch.float32
    num_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_capacity_factor: float | None = None
    moe_drop_policy: str = "probs"
    moe_aux_loss_coeff: float = 0.0
    moe_aux_loss_type: str = "pooled"
    moe_z_loss_coeff: float = 0.0
    moe_router_jitter: float = 0.0
    moe_shared_expert_ffn: int = 0

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"ModelConfig: hidden_size {self.hidden_size} is not divisible by "
                                 f"num_heads {self.num_heads}; give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                     "num_kv_heads", "head_dim", "max_position_embeddings", "pad_vocab_to"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads {self.num_heads} must be a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        checks = (("norm", _NORMS), ("position", _POSITIONS), ("activation", _ACTIVATIONS))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"ModelConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"ModelConfig.rotary_fraction must be in (0, 1], got {self.rotary_fraction}")
        if self.position == "rope" and self.rotary_dim % 2:
            raise ValueError(f"ModelConfig: rotary width {self.rotary_dim} must be even")
        if self.position_limit is not None and self.position_limit <= 0:
            raise ValueError(f"ModelConfig.position_limit must be positive or None, got {self.position_limit}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive or None, got {self.sliding_window}")
        if self.rope_scaling is not None:
            ops.rope_inv_freq(self.rotary_dim, self.rope_theta, self.rope_scaling_dict)  # validates
        self._check_moe()

    def _check_moe(self):
        if self.num_experts < 0:
            raise ValueError(f"ModelConfig.num_experts must be >= 0, got {self.num_experts}")
        if not self.num_experts:
            return
        if self.moe_ffn_hidden_size is None:
            object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)
        bad = []
        if not 1 <= self.moe_top_k <= self.num_experts:
            bad.append(f"moe_top_k={self.moe_top_k} must be in [1, num_experts={self.num_experts}]")
        if self.moe_ffn_hidden_size <= 0:
            bad.append(f"moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be positive")
        if self.activation != "swiglu":
            bad.append(f"experts are SwiGLU MLPs; activation={self.activation!r} is not supported with num_experts")
        if self.mlp_bias:
            bad.append("experts have no biases (mlp_bias=True is not supported with num_experts)")
        if self.moe_capacity_factor is not None and not self.moe_capacity_factor > 0:
            bad.append(f"moe_capacity_factor must be positive or None (dropless), got {self.moe_capacity_factor}")
        if self.moe_drop_policy not in ops.moe.DROP_POLICIES:
            bad.append(f"moe_drop_policy must be one of {ops.moe.DROP_POLICIES}, got {self.moe_drop_policy!r}")
        if self.moe_aux_loss_type not in ("pooled", "per_layer"):
            bad.append(f"moe_aux_loss_type must be 'pooled' or 'per_layer', got {self.moe_aux_loss_type!r}")
        if self.moe_aux_loss_coeff < 0 or self.moe_z_loss_coeff < 0:
            bad.append("moe_aux_loss_coeff / moe_z_loss_coeff must be >= 0")
        if self.moe_router_jitter:
            bad.append(f"moe_router_jitter={self.moe_router_jitter}: router jitter is not implemented (the "
                       "decoder has no training-mode random stream); use 0")
        if self.moe_shared_expert_ffn < 0:
            bad.append(f"moe_shared_expert_ffn must be >= 0, got {self.moe_shared_expert_ffn}")
        if bad:
            raise ValueError("ModelConfig (mixture of experts): " + "; ".join(bad))

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_fraction)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_to
        return (self.vocab_size + m - 1) // m * m

    def replace(self, **kw) -> "ModelConfig":
        if "rope_scaling" not in kw and self.rope_scaling is not None:
            kw["rope_scaling"] = self.rope_scaling_dict
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["rope_scaling"] = self.rope_scaling_dict
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if isinstance(d.get("dtype"), str):
            d["dtype"] = getattr(torch, d["dtype"])
        return cls(**d)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count (``embeddings=False`` drops the embedding / output matrices)."""
        from .params import count
        n = count(decoder_defs(self))
        if not embeddings:
            emb = self.padded_vocab_size * self.hidden_size
            n -= emb if self.tie_embeddings else 2 * emb
            if self.position == "learned":
                n -= self.max_position_embeddings * self.hidden_size
        return n


# ============================================================================ declarations
def _norm_defs(cfg: ModelConfig) -> dict:
    init = "zeros" if cfg.norm_offset else "ones"
    d = {"weight": P(shape=(cfg.hidden_size,), axes=("embed",), init=init)}
    if cfg.norm == "layer":
        d["bias"] = P(shape=(cfg.hidden_size,), axes=("embed",), init="zeros")
    return d


def _linear_defs(out_f, in_f, out_axis, in_axis, bias: bool, std: float) -> dict:
    d = {"weight": P(shape=(out_f, in_f), axes=(out_axis, in_axis), std=std)}
    if bias:
        d["bias"] = P(shape=(out_f,), axes=(out_axis,), init="zeros")
    return d


def _moe_defs(cfg: ModelConfig) -> dict:
    """An MoE layer: a router ``(E, D)`` (replicated everywhere: every rank routes its tokens) and
    the experts' SwiGLU weights stacked ``(E, out, in)``. The expert width has no logical axis of
    its own (None), so tensor parallelism leaves experts whole; ``experts -> ep`` splits them."""
    E, D, Fe, std = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size, cfg.init_std
    d = {
        "router": {"weight": P(shape=(E, D), axes=(None, "embed"), std=std)},
        "experts": {
            "gate_proj": P(shape=(E, Fe, D), axes=("experts", None, "embed"), std=std),
            "up_proj": P(shape=(E, Fe, D), axes=("experts", None, "embed"), std=std),
            "down_proj": P(shape=(E, D, Fe), axes=("experts", "embed", None), std=std),
        },
    }
    if cfg.moe_shared_expert_ffn:
        S = cfg.moe_shared_expert_ffn
        d["shared"] = {"gate_proj": _linear_defs(S, D, "mlp", "embed", False, std),
                       "up_proj": _linear_defs(S, D, "mlp", "embed", False, std),
                       "down_proj": _linear_defs(D, S, "embed", "mlp", False, std)}
    return d


def decoder_defs(cfg: ModelConfig) -> dict:
    """The parameter declarations of the decoder (nothing allocated)."""
    D, Dh, std = cfg.hidden_size, cfg.head_dim, cfg.init_std
    qw, kvw, F = cfg.num_heads * Dh, cfg.num_kv_heads * Dh, cfg.ffn_hidden_size

    def layer():
        attn = {
            "q_proj": _linear_defs(qw, D, "heads", "embed", cfg.qkv_bias, std),
            "k_proj": _linear_defs(kvw, D, "kv_heads", "embed", cfg.qkv_bias, std),
            "v_proj": _linear_defs(kvw, D, "kv_heads", "embed", cfg.qkv_bias, std),
            "o_proj": _linear_defs(D, qw, "embed", "heads", cfg.o_bias, std),
        }
        if cfg.activation in ("swiglu", "geglu"):
            mlp = {
                "gate_proj": _linear_defs(F, D, "mlp", "embed", cfg.mlp_bias, std),
                "up_proj": _linear_defs(F, D, "mlp", "embed", cfg.mlp_bias, std),
                "down_proj": _linear_defs(D, F, "embed", "mlp", cfg.mlp_bias, std),
            }
        else:
            mlp = {
                "up_proj": _linear_defs(F, D, "mlp", "embed", cfg.mlp_bias, std),
                "down_proj": _linear_defs(D, F, "embed", "mlp", cfg.mlp_bias, std),
            }
        if cfg.num_experts:
            mlp = _moe_defs(cfg)
        return {"input_norm": _norm_defs(cfg), "attn": attn, "post_attn_norm": _norm_defs(cfg), "mlp": mlp}

    defs: dict = {"embed": {"weight": P(shape=(cfg.padded_vocab_size, D), axes=("vocab", "embed"), std=std)}}
    if cfg.position == "learned":
        defs["pos_embed"] = {"weight": P(shape=(cfg.max_position_embeddings, D), axes=("positions", "embed"), std=std)}
    if cfg.embedding_norm:
        defs["embed_norm"] = _norm_defs(cfg)
    defs["layers"] = [layer() for _ in range(cfg.num_layers)]
    defs["final_norm"] = _norm_defs(cfg)
    if not cfg.tie_embeddings:
        defs["lm_head"] = {"weight": P(shape=(cfg.padded_vocab_size, D), axes=("vocab", "embed"), std=std)}
    return defs


# ============================================================================ KV cache and context
@dataclasses.dataclass
class KVCache:
    """Preallocated per-layer key/value buffers for incremental decoding.

    Attributes:
      k, v: per layer ``(B, S_max, Hkv, Dh)``.
      valid: ``(B, S_max)`` True where a slot holds a real (non-pad) token.
      pos: ``(B, S_max)`` token position of each slot.
      length: slots filled so far (the same for every row; left padding keeps rows aligned).
    """

    k: list
    v: list
    valid: torch.Tensor
    pos: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, *, num_layers: int | None = None,
                 kv_heads: int | None = None, dtype=None, device=None) -> "KVCache":
        L = num_layers or cfg.num_layers
        shape = (batch, max_len, kv_heads or cfg.num_kv_heads, cfg.head_dim)
        dt = dtype or cfg.dtype
        return cls(k=[torch.zeros(shape, dtype=dt, device=device) for _ in range(L)],
                   v=[torch.zeros(shape, dtype=dt, device=device) for _ in range(L)],
                   valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                   pos=torch.zeros(batch, max_len, dtype=torch.long, device=device))

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


@dataclasses.dataclass
class Context:
    """Per-forward state shared by every block: positions, rotary tables, masks, cache."""

    positions: torch.Tensor                   # (B, T)
    cos: torch.Tensor | None = None           # (B, T, R/2)
    sin: torch.Tensor | None = None
    mask: torch.Tensor | None = None          # (B, 1, T, S) bool, None = plain causal
    alibi: torch.Tensor | None = None         # (B, H, T, S) additive bias
    cache: KVCache | None = None
    start: int = 0                            # first cache slot written by this forward
    cu_seqlens: torch.Tensor | None = None
    kernels: Kernels = dataclasses.field(default_factory=Kernels)  # the model's kernel policy
    # Replaces ``ops.attention`` for the attention core (same signature); transforms such as
    # selective recompute set it per forward without rebuilding the block. None = ops.attention.
    attention_core: Callable | None = None
    # (B, T) True = a real token (from attention_mask); None = every token. MoE router
    # statistics count only real tokens (padding is routed but not counted, as transformers).
    token_valid: torch.Tensor | None = None
    # Sums one MoE layer's additive router statistics (a dict of tensors) over the ranks holding
    # the other tokens of the same sequences (sequence parallel sets it, with token_valid cut to
    # the local shard); None = all of the forward's tokens are here.
    moe_stats_reduce: Callable | None = None


def make_context(cfg: ModelConfig, tokens: torch.Tensor, *, position_ids=None, attention_mask=None,
                 cu_seqlens=None, cache: KVCache | None = None, dtype=None,
                 kernels: Kernels | None = None) -> Context:
    """Build the :class:`Context` for one forward pass.

    Args:
      tokens: ``(B, T)``.
      position_ids: ``(B, T)``; default: from ``attention_mask`` (left padding skipped), else
        ``cache.length + arange(T)``.
      attention_mask: ``(B, T)`` (or ``(B, cache.length + T)`` with a cache) 1 = token, 0 = pad.
      cu_seqlens: cumulative lengths over the flattened ``B*T`` tokens of packed documents.
      cache: a :class:`KVCache` to read and append to.
    """
    B, T = tokens.shape
    dev = tokens.device
    start = cache.length if cache is not None else 0
    if cfg.position_limit is not None and start + T > cfg.position_limit:
        raise ValueError(f"sequence of {start + T} positions exceeds position_limit={cfg.position_limit}: the "
                         "reference model changes behaviour past it (e.g. Qwen's dynamic NTK / log-n "
                         "attention), which pmodel does not implement")
    am = None
    if attention_mask is not None:
        am = attention_mask.to(dev).bool()
        if am.shape[1] == T + start:
            am = am[:, start:]
        if am.shape != (B, T):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match tokens {(B, T)}"
                             + (f" (+ {start} cached)" if start else ""))
    if position_ids is None:
        if am is not None:
            prev = cache.valid[:, :start].sum(1, keepdim=True) if cache is not None else 0
            position_ids = (am.long().cumsum(1) - 1 + prev).clamp(min=0)
        else:
            position_ids = torch.arange(start, start + T, device=dev).expand(B, T)
    position_ids = position_ids.to(dev)

    q_idx = torch.arange(start, start + T, device=dev).expand(B, T)
    doc = None
    if cu_seqlens is not None:
        flat = torch.arange(B * T, device=dev)
        doc = torch.searchsorted(cu_seqlens.to(dev)[1:].long(), flat, right=True).view(B, T)

    if cache is not None:
        if start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} slots; {start} used + {T} new exceeds it")
        cache.valid[:, start:start + T] = am if am is not None else True
        cache.pos[:, start:start + T] = position_ids
        S = start + T
        k_idx = torch.arange(S, device=dev).expand(B, S)
        k_pos, key_valid = cache.pos[:, :S], cache.valid[:, :S]
    else:
        k_idx, k_pos, key_valid = q_idx, position_ids, am

    plain = am is None and doc is None and cfg.sliding_window is None and cache is None
    mask = None if plain else ops.attention_mask(
        q_idx=q_idx, k_idx=k_idx, causal=True, q_pos=position_ids, k_pos=k_pos,
        window=cfg.sliding_window, key_valid=key_valid, q_doc=doc, k_doc=doc)

    ctx = Context(positions=position_ids, mask=mask, cache=cache, start=start, cu_seqlens=cu_seqlens,
                  kernels=kernels or Kernels(), token_valid=am)
    if cfg.position == "rope":
        inv = ops.rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_dict)
        ctx.cos, ctx.sin = ops.rope_cos_sin(position_ids, inv, dtype or cfg.dtype)
    elif cfg.position == "alibi":
        ctx.alibi = ops.alibi_bias(ops.alibi_slopes(cfg.num_heads), position_ids, k_pos)
    return ctx


# ============================================================================ the decoder
def _norm(cfg: ModelConfig, p: dict, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    if cfg.norm == "rms":
        return ops.rms_norm(x, p["weight"], cfg.norm_eps, cfg.norm_offset, kernels=kernels)
    return ops.layer_norm(x, p["weight"], p.get("bias"), cfg.norm_eps, kernels=kernels)


def _lin(p: dict, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    return ops.linear(x, p["weight"], p.get("bias"), kernels=kernels)


def _attention(cfg: ModelConfig, p: dict, x: torch.Tensor, ctx: Context, layer: int, kernels: Kernels):
    Dh = cfg.head_dim
    q = _lin(p["q_proj"], x, kernels)
    # T from the projection, not from x: under sequence parallel x is a sequence shard and the
    # column-parallel projection returns the gathered full sequence.
    B, T = q.shape[:2]
    q = q.view(B, T, -1, Dh)  # (B, T, Hq, Dh), Hq local
    k = _lin(p["k_proj"], x, kernels).view(B, T, -1, Dh)  # (B, T, Hkv, Dh)
    v = _lin(p["v_proj"], x, kernels).view(B, T, -1, Dh)
    if ctx.cos is not None:
        q = ops.rotary(q, ctx.cos, ctx.sin, interleaved=cfg.rope_interleaved, kernels=kernels)
        k = ops.rotary(k, ctx.cos, ctx.sin, interleaved=cfg.rope_interleaved, kernels=kernels)
    if ctx.cache is not None:
        c, s = ctx.cache, ctx.start
        c.k[layer][:, s:s + T] = k
        c.v[layer][:, s:s + T] = v
        k, v = c.k[layer][:, : s + T], c.v[layer][:, : s + T]
    bias = ctx.alibi
    if bias is not None and bias.shape[1] != q.shape[2]:
        raise ValueError("ALiBi with sharded heads needs the tensor-parallel transform's slopes")
    core = ctx.attention_core or ops.attention
    o = core(q, k, v, mask=ctx.mask, causal=ctx.mask is None, bias=bias,
             cu_seqlens=ctx.cu_seqlens, window=cfg.sliding_window, kernels=kernels)
    return _lin(p["o_proj"], o.reshape(B, T, -1), kernels)


def _mlp(cfg: ModelConfig, p: dict, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    if cfg.activation == "swiglu":
        h = ops.swiglu(_lin(p["gate_proj"], x, kernels), _lin(p["up_proj"], x, kernels), kernels=kernels)
    elif cfg.activation == "geglu":
        h = ops.geglu(_lin(p["gate_proj"], x, kernels), _lin(p["up_proj"], x, kernels), kernels=kernels)
    else:
        approx = "tanh" if cfg.activation == "gelu" else "none"
        h = ops.gelu(_lin(p["up_proj"], x, kernels), approximate=approx, kernels=kernels)
    return _lin(p["down_proj"], h, kernels)


def _moe(cfg: ModelConfig, p: dict, x: torch.Tensor, ctx: Context, kernels: Kernels):
    """The mixture-of-experts MLP: ``(B, T, D) -> ((B, T, D), router statistics)``.

    Router logits in fp32; softmax over experts, top-k, renormalised (Mixtral); dropless unless
    ``moe_capacity_factor`` is set (Megatron's capacity and drop policy, see ModelConfig); the
    token-expert pairs sorted by expert (``ops.moe_dispatch``), the experts' SwiGLU MLPs as one
    grouped computation (``ops.grouped_mlp``; an expert-parallel wrapper exchanges the rows
    there), and the rows combined with the router weights (``ops.moe_combine``).
    """
    B, T, D = x.shape
    xf = x.reshape(B * T, D)                                                 # (N, D)
    rw = p["router"]["weight"]
    if not isinstance(rw, torch.Tensor):
        raise TypeError(f"the MoE router weight must be a plain tensor, got {type(rw).__name__}")
    logits = torch.nn.functional.linear(xf.float(), rw.float())              # (N, E) fp32
    E, k = cfg.num_experts, cfg.moe_top_k
    probs, weights, experts = ops.moe_route(logits, k)                       # (N, E), (N, k), (N, k)
    keep = None
    if cfg.moe_capacity_factor is not None:
        cap = ops.moe_capacity(B * T, E, k, cfg.moe_capacity_factor)
        keep = ops.moe_capacity_keep(experts, weights, E, cap, cfg.moe_drop_policy)
    xs, routed = ops.moe_dispatch(xf, experts, E, keep, kernels=kernels)    # (M, D) grouped by expert
    ex = p["experts"]
    ys = ops.grouped_mlp(xs, routed.counts, ex["gate_proj"], ex["up_proj"], ex["down_proj"], kernels=kernels)
    out = ops.moe_combine(ys, weights, routed, kernels=kernels).view(B, T, D)
    if "shared" in p:
        out = out + _mlp(cfg, p["shared"], x, kernels)
    extra = {"dropped": routed.dropped.float().reshape(()), "pairs": probs.new_tensor(float(B * T * k))}
    stats = ops.router_stats(logits, probs, experts, ctx.token_valid, k, extra=extra, reduce=ctx.moe_stats_reduce)
    return out, stats


def moe_stats_zeros(cfg: ModelConfig, device=None) -> dict:
    """The empty sum of :func:`_moe`'s per-layer statistics (the start of an MoE carry)."""
    E = cfg.num_experts
    z = torch.zeros((), device=device)
    return {"counts": torch.zeros(E, device=device), "prob_sum": torch.zeros(E, device=device), "tokens": z,
            "z_sum": z, "z_mean": z, "layer_lb": z, "layers": z, "dropped": z, "pairs": z}


# The keys of the carry's statistics in a fixed order (a pipeline stage sends them as one flat
# fp32 vector) and those that carry no gradient (counts, not functions of the parameters).
MOE_STATS_KEYS = ("counts", "prob_sum", "tokens", "z_sum", "z_mean", "layer_lb", "layers", "dropped", "pairs")
_MOE_STATS_DETACHED = ("counts", "tokens", "layers", "dropped", "pairs")


def moe_stats_flatten(stats: dict) -> torch.Tensor:
    """The statistics as one flat fp32 vector (``2E + 7`` entries, :data:`MOE_STATS_KEYS` order),
    differentiable in the differentiable entries: what a pipeline stage sends with its activations."""
    return torch.cat([stats[k].float().reshape(-1) for k in MOE_STATS_KEYS])


def moe_stats_unflatten(cfg: ModelConfig, flat: torch.Tensor) -> dict:
    """Inverse of :func:`moe_stats_flatten` (views; the count entries detached, as :func:`_moe`
    produces them, so no gradient flows into them)."""
    E = cfg.num_experts
    sizes = [E if k in ("counts", "prob_sum") else 1 for k in MOE_STATS_KEYS]
    out = {}
    for k, part, n in zip(MOE_STATS_KEYS, flat.split(sizes), sizes):
        part = part if n == E else part.reshape(())
        out[k] = part.detach() if k in _MOE_STATS_DETACHED else part
    return out


def moe_stats_size(cfg: ModelConfig) -> int:
    return 2 * cfg.num_experts + len(MOE_STATS_KEYS) - 2


def moe_loss_term(cfg: ModelConfig, stats: dict, n, denom):
    """The auxiliary part of a micro-batch's loss and its metrics (detached).

    ``(extra, aux)``: ``extra = (n / denom) * (moe_aux_loss_coeff * lb + moe_z_loss_coeff * z)``
    (None when both coefficients are 0), ``n`` the micro-batch's counted tokens and ``denom`` the
    loss denominator (see :meth:`Model.loss`); ``aux`` the ``moe_*`` metrics."""
    lb, z = moe_losses(cfg, stats)
    share = n / denom
    extra = None
    if cfg.moe_aux_loss_coeff or cfg.moe_z_loss_coeff:
        extra = share * (cfg.moe_aux_loss_coeff * lb + cfg.moe_z_loss_coeff * z)
    aux = dict(moe_aux_loss=lb.detach(), moe_z_loss=z.detach(), moe_dropped=stats["dropped"].detach(),
               moe_pairs=stats["pairs"].detach(), moe_expert_counts=stats["counts"].detach(),
               moe_weight=torch.as_tensor(share).detach())
    return extra, aux


def moe_losses(cfg: ModelConfig, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(load_balancing_loss, z_loss)`` (coefficients not applied) from the statistics summed
    over the layers of one forward (see ``ModelConfig.moe_aux_loss_type``)."""
    if cfg.moe_aux_loss_type == "pooled":
        n = stats["tokens"].clamp(min=1)                                     # layers x tokens
        lb = cfg.num_experts * ((stats["counts"] / n) * (stats["prob_sum"] / n)).sum()
    else:
        lb = stats["layer_lb"]
    return lb, stats["z_mean"]


def build(cfg: ModelConfig, kernels: Kernels | None = None, *, family: str | None = None) -> "Model":
    """The decoder ``Model`` for ``cfg``.

    The functions read the kernel policy from ``ctx.kernels`` (set from ``Model.kernels`` on every
    forward), so ``model.replace(kernels=...)`` takes effect without rebuilding.
    """
    kernels = kernels or Kernels()

    def embed(params, tokens, ctx: Context):
        kernels = ctx.kernels
        h = ops.embedding(tokens, params["embed"]["weight"], kernels=kernels)  # (B, T, D)
        if cfg.embedding_scale is not None:
            # Gemma multiplies by sqrt(D) rounded to the activation dtype.
            h = h * torch.tensor(cfg.embedding_scale, dtype=h.dtype)
        if cfg.position == "learned":
            h = h + ops.embedding(ctx.positions, params["pos_embed"]["weight"], kernels=kernels)
        if cfg.embedding_norm:
            h = _norm(cfg, params["embed_norm"], h, kernels)
        return h

    def block(p, h, ctx: Context, layer: int):
        kernels = ctx.kernels
        h = h + _attention(cfg, p["attn"], _norm(cfg, p["input_norm"], h, kernels), ctx, layer, kernels)
        return h + _mlp(cfg, p["mlp"], _norm(cfg, p["post_attn_norm"], h, kernels), kernels)

    def moe_block(p, carry, ctx: Context, layer: int):
        # An MoE decoder's residual carry is (h, router statistics summed so far): the
        # statistics travel with the activations through every layer runner (recompute, tensor
        # parallel), never through mutable state.
        if isinstance(carry, torch.Tensor):
            raise TypeError("an MoE block takes the carry (h, router statistics) that Model.hidden_aux (or a "
                            "pipeline stage) starts, not bare activations")
        h, acc = carry
        kernels = ctx.kernels
        h = h + _attention(cfg, p["attn"], _norm(cfg, p["input_norm"], h, kernels), ctx, layer, kernels)
        out, stats = _moe(cfg, p["mlp"], _norm(cfg, p["post_attn_norm"], h, kernels), ctx, kernels)
        return h + out, {key: acc[key] + stats[key].to(acc[key].device) for key in acc}

    def out_weight(params):
        w = params["embed"]["weight"] if cfg.tie_embeddings else params["lm_head"]["weight"]
        if cfg.head_norm:  # Baichuan2's NormHead: unit rows (row-local, so vocab shards normalise alone)
            w = map_rows(w, lambda t: torch.nn.functional.normalize(t, dim=-1))
        return w

    def head(params, h, ctx: Context):
        kernels = ctx.kernels
        logits = ops.linear(_norm(cfg, params["final_norm"], h, kernels), out_weight(params), kernels=kernels)
        return logits[..., : cfg.vocab_size] if cfg.padded_vocab_size != cfg.vocab_size else logits

    def head_loss(params, h, labels, weights, ctx: Context):
        kernels = ctx.kernels
        x = _norm(cfg, params["final_norm"], h, kernels)
        return ops.linear_cross_entropy(x, out_weight(params), labels, weights, kernels=kernels)

    return Model(config=cfg, defs=decoder_defs(cfg), embed=embed, block=moe_block if cfg.num_experts else block, head=head,
                 head_loss=head_loss, kernels=kernels, family=family)


def counted_mask(batch: dict) -> torch.Tensor:
    """Which positions count towards the loss: ``labels != IGNORE_INDEX`` and ``loss_mask > 0``.

    The one definition of a counted token (the loss, its denominator, metrics and every train
    step use it)."""
    mask = batch["labels"] != ops.IGNORE_INDEX
    if batch.get("loss_mask") is not None:
        mask = mask & (batch["loss_mask"] > 0)
    return mask


def count_tokens(batch: dict) -> int:
    """The number of counted tokens of a micro-batch (see :func:`counted_mask`)."""
    return int(counted_mask(batch).sum())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Model:
    """A model: its config, parameter declarations and pure functions over params.

    Attributes:
      config: the :class:`ModelConfig`.
      defs: pytree of :class:`~pmodel.params.P` declarations.
      embed: ``(params, tokens, ctx) -> h`` ``(B, T, D)``.
      block: ``(layer_params, h, ctx, layer_index) -> h``.
      head: ``(params, h, ctx) -> logits`` ``(B, T, V)``.
      head_loss: ``(params, h, labels, weights, ctx) -> (weighted_loss_sum, per_token_loss)``;
        never materialises full logits when the kernels policy fuses cross-entropy.
      kernels: the :class:`~pmodel.ops.Kernels` policy.
      family: the family name (for HF export / chat template), if known.
      layout: where the parameters live on the mesh (a :class:`~pmodel.parallel.layout.Layout`,
        set by sharding transforms; None = every leaf whole on every rank). :func:`pmodel.init`
        materialises local shards through it and a train step runs its after-backward gradient
        work (``layout.sync_grads``).
      transforms: names of transforms applied, outermost last (informational).
      layer_runner: optional ``(block, layer_params_list, h, ctx, first_index) -> h`` that runs
        consecutive blocks (recompute groups them); None = call ``block`` once per layer.
    """

    config: ModelConfig
    defs: Any
    embed: Callable
    block: Callable
    head: Callable
    head_loss: Callable
    kernels: Kernels = dataclasses.field(default_factory=Kernels)
    family: str | None = None
    layout: Any = None
    transforms: tuple[str, ...] = ()
    layer_runner: Callable | None = None

    def replace(self, **kw) -> "Model":
        return dataclasses.replace(self, **kw)

    def context(self, tokens, **kw) -> Context:
        return make_context(self.config, tokens, kernels=self.kernels, **kw)

    def hidden(self, params, tokens, *, position_ids=None, attention_mask=None, cu_seqlens=None,
               cache: KVCache | None = None, ctx: Context | None = None) -> torch.Tensor:
        """Final hidden states ``(B, T, D)`` before the output norm."""
        if ctx is None:
            ctx = self.context(tokens, position_ids=position_ids, attention_mask=attention_mask,
                               cu_seqlens=cu_seqlens, cache=cache)
        return self.hidden_aux(params, tokens, ctx=ctx, cache=cache)[0]

    def hidden_aux(self, params, tokens, *, ctx: Context, cache: KVCache | None = None):
        """``(h, stats)``: final hidden states and, for an MoE model, the router statistics summed
        over its layers (:func:`moe_losses` turns them into the auxiliary losses); None for a
        dense model."""
        h = self.embed(params, tokens, ctx)
        stats = None
        if self.config.num_experts:
            h, stats = self.run_layers(params["layers"], (h, moe_stats_zeros(self.config, h.device)), ctx, 0)
        else:
            h = self.run_layers(params["layers"], h, ctx, 0)
        if cache is not None:
            cache.length = ctx.start + tokens.shape[1]
        return h, stats

    def run_layers(self, layer_params: list, h: torch.Tensor, ctx: Context, first: int = 0) -> torch.Tensor:
        """Run blocks ``first, first + 1, ...`` over ``layer_params`` (a pipeline stage's slice)."""
        if self.layer_runner is not None:
            return self.layer_runner(self.block, layer_params, h, ctx, first)
        for i, lp in enumerate(layer_params):
            h = self.block(lp, h, ctx, first + i)
        return h

    def apply(self, params, tokens, *, position_ids=None, attention_mask=None, cu_seqlens=None,
              cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for int64 ``tokens`` ``(B, T)``.

        Args:
          position_ids: ``(B, T)``; default derived from ``attention_mask`` / cache.
          attention_mask: ``(B, T)`` 1 = token, 0 = padding (left or right).
          cu_seqlens: packed-document boundaries over the flattened batch.
          cache: a :class:`KVCache` (incremental decoding); it is filled and advanced.
        """
        ctx = self.context(tokens, position_ids=position_ids, attention_mask=attention_mask,
                           cu_seqlens=cu_seqlens, cache=cache)
        return self.head(params, self.hidden(params, tokens, ctx=ctx, cache=cache), ctx)

    def loss(self, params, batch: dict, *, num_tokens: int | torch.Tensor | None = None):
        """Mean next-token cross-entropy over the batch's counted tokens.

        Args:
          batch: ``tokens``, ``labels`` (already shifted), optional ``loss_mask``,
            ``position_ids``, ``attention_mask``, ``cu_seqlens``.
          num_tokens: the denominator; default the batch's own count of counted tokens. Pass the
            count over all micro-batches when accumulating gradients, so their sum is the mean.

        Returns:
          ``(loss, aux)`` with ``aux = {"num_tokens", "loss_sum", "per_token"}`` (detached).
          An MoE model adds ``moe_aux_loss_coeff * lb + moe_z_loss_coeff * z`` to the loss, times
          this micro-batch's share of the denominator (``n / num_tokens``: 1 for a whole batch,
          so accumulated micro-batches sum to the per-micro-batch mean), and reports (detached)
          ``moe_aux_loss`` (lb), ``moe_z_loss`` (z), ``moe_dropped`` (token-expert pairs dropped
          by the capacity), ``moe_pairs`` (pairs routed), ``moe_expert_counts`` ``(E,)`` (pairs
          per expert, valid tokens, summed over layers) and ``moe_weight`` (the share). ``loss_sum``
          stays the cross-entropy sum.
        """
        tokens = batch["tokens"]
        mask = counted_mask(batch)
        labels = batch["labels"].masked_fill(~mask, ops.IGNORE_INDEX)
        n = mask.sum()
        denom = num_tokens if num_tokens is not None else n.clamp(min=1)
        weights = mask.float() / denom
        ctx = self.context(tokens, position_ids=batch.get("position_ids"),
                           attention_mask=batch.get("attention_mask"), cu_seqlens=batch.get("cu_seqlens"))
        h, stats = self.hidden_aux(params, tokens, ctx=ctx)
        loss, per_token = self.head_loss(params, h, labels, weights, ctx)
        aux = {"num_tokens": n.detach(), "loss_sum": per_token.sum().detach(), "per_token": per_token}
        if stats is not None:
            extra, moe_aux = moe_loss_term(self.config, stats, n, denom)
            if extra is not None:
                loss = loss + extra.to(loss.dtype)
            aux.update(moe_aux)
        return loss, aux
