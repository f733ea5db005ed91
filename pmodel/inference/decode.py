"""The decoder state of one generation: a KV cache, a prefill and a per-token step.

:class:`Decoder` runs a prompt through the model once (``prefill``, the model's own forward
writing a :class:`~pmodel.model.KVCache`), then one token per row per ``step``.

Two step implementations, chosen per model:

* the **fast step** for the plain config-driven decoder on plain tensors (no wrapper weights, no
  sharding layout). Everything that does not change per token is prepared once: q/k/v and
  gate/up projections fused into one matmul each (concatenated rows: the same dot products),
  the rotary tables for every position of the cache (same values as the forward's, with the
  rotate-half / pair-swap sign folded in), the cache in the ``(B, H, S, D)`` layout attention
  reads, and the key mask / ALiBi bias built once per step for all layers, not per layer. Per
  layer the step is the ops alone (about 15 torch calls) — no context, no mask rebuilt, no
  Python work beyond the calls.
* the **generic step** (``model.apply`` with the cache) for everything else: LoRA wrappers,
  tensor-parallel wrappers (the cache then holds this rank's KV heads), custom blocks.

Both give the model's logits (the fast one is checked against the generic one in the tests
for every decoder switch: RoPE full / partial / interleaved, ALiBi, learned positions,
LayerNorm, GeLU / GeGLU / SwiGLU, biases, GQA / MQA, tied / scaled embeddings, sliding window,
left padding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops, tree
from ..model import KVCache, Model

__all__ = ["Decoder", "fast_path_problem", "cache_width"]

# Fuse q/k/v and gate/up into one matrix each when the copies together stay under this size
# (the fused matrices are copies: a large model would hold its projections twice).
_FUSE_LIMIT_BYTES = 2 * 2**30


def _is_standard_block(model: Model) -> bool:
    blk = model.block
    return (getattr(blk, "__module__", None) == "pmodel.model"
            and getattr(blk, "__qualname__", "") == "build.<locals>.block")


# The ModelConfig fields the fast step implements. A field added to the decoder later is not
# here: a model that sets it away from its default runs the generic step until the fast step
# learns it (fast_path_problem names the field).
_FAST_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "num_kv_heads", "head_dim",
    "max_position_embeddings", "norm", "norm_eps", "norm_offset", "position", "rope_theta", "rope_scaling",
    "rotary_fraction", "rope_interleaved", "qkv_bias", "o_bias", "mlp_bias", "activation", "tie_embeddings",
    "embedding_scale", "embedding_norm", "sliding_window", "pad_vocab_to", "head_norm", "position_limit",
    "init_std", "dtype"})


def fast_path_problem(model: Model, params) -> str | None:
    """Why the fast step cannot run this model (None when it can)."""
    import dataclasses
    cfg = model.config
    for f in dataclasses.fields(cfg):
        if f.name not in _FAST_FIELDS and getattr(cfg, f.name) != f.default:
            return f"ModelConfig.{f.name}={getattr(cfg, f.name)!r} is not implemented by the fast step"
    if model.layout is not None or "tensor_parallel" in model.transforms:
        return "the model is sharded (tensor parallel); the generic step runs the wrappers"
    if not _is_standard_block(model) or model.embed.__qualname__ != "build.<locals>.embed" \
            or model.head.__qualname__ != "build.<locals>.head":
        return "the model's functions are not the config-driven decoder's"
    for leaf in tree.leaves(params, is_leaf=ops.is_wrapper):
        if not isinstance(leaf, torch.Tensor):
            return f"a {type(leaf).__name__} weight wrapper (e.g. unmerged LoRA) runs through the generic step"
    return None


def cache_width(params, cfg) -> int:
    """KV heads held by this process: read from the k projection (a LoRA or tensor-parallel
    wrapper reports its base's local shape), so a TP rank allocates only its heads."""
    k_w = params["layers"][0]["attn"]["k_proj"]["weight"]
    return k_w.shape[0] // cfg.head_dim


class Decoder:
    """KV-cached decoding for ``model`` over a batch of rows.

    Args:
      model, params: the model (plain, LoRA, or tensor parallel: then ``params`` are the rank's).
      batch: rows (prompts, or prompts x beams after :meth:`reorder`).
      max_len: cache slots: prompt length + new tokens at most.
      fast: ``"auto"`` (the fast step when :func:`fast_path_problem` finds none), ``True``
        (raise with the reason when it cannot run), ``False`` (always the generic step).
      fuse: fuse q/k/v and gate/up (None = when the fused copies stay under 2 GiB).
    """

    def __init__(self, model: Model, params, *, batch: int, max_len: int, fast: bool | str = "auto",
                 fuse: bool | None = None):
        self.model, self.params, self.cfg = model, params, model.config
        emb = params["embed"]["weight"]
        self.device, self.dtype = emb.device, emb.dtype
        problem = fast_path_problem(model, params) if fast else "fast=False"
        if fast is True and problem:
            raise ValueError(f"Decoder(fast=True): {problem}")
        self.fast = problem is None
        self.batch, self.max_len = batch, max_len
        self.length = 0
        self.padded = False
        if self.fast:
            self._prepare_fast(fuse)

    # ------------------------------------------------------------------ preparation
    def _prepare_fast(self, fuse: bool | None) -> None:
        cfg, p = self.cfg, self.params
        dev, dt = self.device, self.dtype
        layers = p["layers"]
        if fuse is None:
            per = sum(t.numel() * t.element_size() for lp in layers for t in tree.leaves(lp)
                      if t.dim() == 2)
            fuse = per <= _FUSE_LIMIT_BYTES
        self.gated = cfg.activation in ("swiglu", "geglu")
        self.layers = []
        for lp in layers:
            a, m = lp["attn"], lp["mlp"]
            names = ("q_proj", "k_proj", "v_proj")
            if fuse:
                qkv = [(torch.cat([a[n]["weight"] for n in names]),
                        torch.cat([a[n]["bias"] for n in names]) if cfg.qkv_bias else None)]
            else:
                qkv = [(a[n]["weight"], a[n].get("bias")) for n in names]
            if self.gated and fuse:
                up = [(torch.cat([m["gate_proj"]["weight"], m["up_proj"]["weight"]]),
                       torch.cat([m["gate_proj"]["bias"], m["up_proj"]["bias"]]) if cfg.mlp_bias else None)]
            elif self.gated:
                up = [(m[n]["weight"], m[n].get("bias")) for n in ("gate_proj", "up_proj")]
            else:
                up = [(m["up_proj"]["weight"], m["up_proj"].get("bias"))]
            self.layers.append((lp["input_norm"], qkv, (a["o_proj"]["weight"], a["o_proj"].get("bias")),
                                lp["post_attn_norm"], up, (m["down_proj"]["weight"], m["down_proj"].get("bias"))))
        self.hq = layers[0]["attn"]["q_proj"]["weight"].shape[0] // cfg.head_dim
        self.hkv = layers[0]["attn"]["k_proj"]["weight"].shape[0] // cfg.head_dim
        self.out_w = p["embed"]["weight"] if cfg.tie_embeddings else p["lm_head"]["weight"]
        if cfg.head_norm:  # Baichuan2's NormHead, as the forward applies it (once here, not per token)
            self.out_w = F.normalize(self.out_w, dim=-1)
        # Rotary tables for every slot position, computed as the forward computes them, with the
        # rotation's sign folded in: rotate-half is x*cos + roll(x, R/2)*[-sin, sin]; the
        # interleaved form swaps each pair instead of rolling.
        self.rot = None
        if cfg.position == "rope":
            inv = ops.rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling_dict)
            cos, sin = ops.rope_cos_sin(torch.arange(self.max_len, device=dev)[None], inv, dt)  # (1, S, R/2)
            cos, sin = cos[0], sin[0]
            if cfg.rope_interleaved:
                cosf = torch.stack((cos, cos), -1).flatten(-2)
                sins = torch.stack((-sin, sin), -1).flatten(-2)
            else:
                cosf, sins = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
            self.rot = torch.cat((cosf, sins), -1)  # (S, 2R)
        self.slopes = ops.alibi_slopes(cfg.num_heads).to(dev) if cfg.position == "alibi" else None
        # Caches in the layout attention reads: (B, Hkv, S, Dh) per layer.
        shape = (self.batch, self.hkv, self.max_len, cfg.head_dim)
        self.kc = [torch.zeros(shape, dtype=dt, device=dev) for _ in layers]
        self.vc = [torch.zeros(shape, dtype=dt, device=dev) for _ in layers]
        self.valid = torch.zeros(self.batch, self.max_len, dtype=torch.bool, device=dev)
        self.kpos = torch.zeros(self.batch, self.max_len, dtype=torch.long, device=dev)

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt ``(B, T)`` (left-padded with ``attention_mask``); returns the logits of
        its last position ``(B, V)``."""
        B, T = ids.shape
        if B != self.batch:
            raise ValueError(f"Decoder: prompt batch {B} != decoder batch {self.batch}")
        if T > self.max_len:
            raise ValueError(f"Decoder: prompt of {T} tokens does not fit the {self.max_len} cache slots")
        am = None
        if attention_mask is not None:
            am = attention_mask.to(ids.device)
            self.padded = bool((am == 0).any())
            if not self.padded:
                am = None
        kvh = cache_width(self.params, self.cfg)
        cache = KVCache.allocate(self.cfg, B, T if self.fast else self.max_len, num_layers=len(self.params["layers"]),
                                 kv_heads=kvh, dtype=self.dtype, device=self.device)
        logits = self.model.apply(self.params, ids, attention_mask=am, cache=cache)[:, -1]
        self.length = T
        if self.fast:
            for l_, (k, v) in enumerate(zip(cache.k, cache.v)):
                self.kc[l_][:, :, :T] = k.transpose(1, 2)
                self.vc[l_][:, :, :T] = v.transpose(1, 2)
            self.valid[:, :T] = cache.valid
            self.kpos[:, :T] = cache.pos
            self.pos = cache.valid.sum(1)  # (B,) position of each row's next token
        else:
            self.cache = cache
        return logits

    # ------------------------------------------------------------------ one token
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``(B,)``; returns the next logits ``(B, V)``."""
        if self.length >= self.max_len:
            raise ValueError(f"Decoder: the {self.max_len} cache slots are full")
        lim = self.cfg.position_limit
        if self.fast and lim is not None and self.length + 1 > lim:  # the forward's own check
            raise ValueError(f"sequence of {self.length + 1} positions exceeds position_limit={lim}")
        if not self.fast:
            am = torch.ones(self.batch, 1, dtype=torch.long, device=self.device) if self.padded else None
            out = self.model.apply(self.params, tokens[:, None], attention_mask=am, cache=self.cache)[:, -1]
            self.length += 1
            return out
        out = self._fast_step(tokens)
        self.length += 1
        self.pos += 1
        return out

    def _norm(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.norm == "rms":
            # The reference's formula: normalise in fp32, cast back, then scale by the weight (by
            # 1 + w, in fp32, for an offset).
            w = p["weight"]
            if cfg.norm_offset:
                y = F.rms_norm(x.float(), (x.shape[-1],), None, cfg.norm_eps)
                return (y * (cfg.norm_offset + w.float())).to(x.dtype)
            if x.dtype in (torch.float32, torch.float64):
                # The reference's formula with the fewest small-tensor calls on CPU (F.rms_norm
                # upcasts and copies: 3x slower per call at decode sizes).
                ss = (x * x).sum(-1, keepdim=True).div_(x.shape[-1]).add_(cfg.norm_eps)  # (B, 1)
                return w * (x * torch.rsqrt_(ss))
            return w * F.rms_norm(x.float(), (x.shape[-1],), None, cfg.norm_eps).to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), p["weight"], p.get("bias"), cfg.norm_eps)

    def _fast_step(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg, p = self.cfg, self.params
        B, Dh, Hq, Hkv = self.batch, cfg.head_dim, self.hq, self.hkv
        L = self.length
        S = L + 1
        pos = self.pos  # (B,)
        x = F.embedding(tokens, p["embed"]["weight"])  # (B, D)
        if cfg.embedding_scale is not None:
            x = x * torch.tensor(cfg.embedding_scale, dtype=x.dtype)
        if cfg.position == "learned":
            x = x + F.embedding(pos, p["pos_embed"]["weight"])
        if cfg.embedding_norm:
            x = self._norm(p["embed_norm"], x)
        # Per-step, shared by all layers: rotary rows, key mask, ALiBi bias.
        if self.rot is not None:
            R = cfg.rotary_dim
            cs = self.rot.index_select(0, pos)[:, None]  # (B, 1, 2R)
            cos, sin = cs[..., :R], cs[..., R:]
        mask = None
        if self.padded or cfg.sliding_window is not None or self.slopes is not None:
            # Without any of these every cached key is visible to the new (last) query: no mask.
            self.kpos[:, L] = pos
            self.valid[:, L] = True
            mask = self.valid[:, :S]  # (B, S)
            if cfg.sliding_window is not None:
                mask = mask & ((pos[:, None] - self.kpos[:, :S]) < cfg.sliding_window)
            mask = mask[:, None, None]  # (B, 1, 1, S)
            if self.slopes is not None:
                dist = (pos[:, None] - self.kpos[:, :S]).float()  # (B, S)
                bias = (-self.slopes[None, :, None, None] * dist[:, None, None]).to(x.dtype)  # (B, H, 1, S)
                mask = bias.masked_fill(~mask, float("-inf"))
        gqa = Hq != Hkv
        nqk = (Hq + Hkv) * Dh
        for li, (n1, qkv, (wo, bo), n2, up, (wd, bd)) in enumerate(self.layers):
            h = self._norm(n1, x)
            if len(qkv) == 1:
                y = F.linear(h, *qkv[0])  # (B, (Hq + 2 Hkv) Dh)
                qk, v = y[:, :nqk].view(B, Hq + Hkv, Dh), y[:, nqk:].view(B, Hkv, Dh)
            else:
                qk = torch.cat((F.linear(h, *qkv[0]), F.linear(h, *qkv[1])), -1).view(B, Hq + Hkv, Dh)
                v = F.linear(h, *qkv[2]).view(B, Hkv, Dh)
            if self.rot is not None:
                if R == Dh:
                    qk = qk * cos + self._swap(qk) * sin
                else:
                    r = qk[..., :R]
                    qk = torch.cat((r * cos + self._swap(r) * sin, qk[..., R:]), -1)
            self.kc[li][:, :, L] = qk[:, Hq:]
            self.vc[li][:, :, L] = v
            o = F.scaled_dot_product_attention(qk[:, :Hq, None], self.kc[li][:, :, :S], self.vc[li][:, :, :S],
                                               attn_mask=mask, enable_gqa=gqa)  # (B, Hq, 1, Dh)
            x = x + F.linear(o.view(B, Hq * Dh), wo, bo)  # (B, D)
            h = self._norm(n2, x)
            if self.gated:
                if len(up) == 1:
                    g, u = F.linear(h, *up[0]).chunk(2, -1)
                else:
                    g, u = F.linear(h, *up[0]), F.linear(h, *up[1])
                a = F.silu(g) * u if cfg.activation == "swiglu" else F.gelu(g, approximate="tanh") * u
            else:
                a = F.gelu(F.linear(h, *up[0]), approximate="tanh" if cfg.activation == "gelu" else "none")
            x = x + F.linear(a, wd, bd)
        logits = F.linear(self._norm(p["final_norm"], x), self.out_w)
        return logits[:, : cfg.vocab_size] if cfg.padded_vocab_size != cfg.vocab_size else logits

    def _swap(self, x: torch.Tensor) -> torch.Tensor:
        """The partner of each rotated channel: the other half (rotate-half) or the other member
        of its pair (interleaved); the sign lives in the sin table."""
        if self.cfg.rope_interleaved:
            return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return x.roll(x.shape[-1] // 2, -1)

    # ------------------------------------------------------------------ beams
    def reorder(self, rows: torch.Tensor) -> None:
        """Rows become ``rows`` of the current ones (beam search: expand prompts to beams, follow
        the surviving beams). The batch size becomes ``len(rows)``."""
        rows = rows.to(self.device)
        if self.fast:
            self.kc = [k.index_select(0, rows) for k in self.kc]
            self.vc = [v.index_select(0, rows) for v in self.vc]
            self.valid, self.kpos, self.pos = (t.index_select(0, rows) for t in (self.valid, self.kpos, self.pos))
        else:
            c = self.cache
            c.k = [k.index_select(0, rows) for k in c.k]
            c.v = [v.index_select(0, rows) for v in c.v]
            c.valid, c.pos = c.valid.index_select(0, rows), c.pos.index_select(0, rows)
        self.batch = rows.shape[0]
