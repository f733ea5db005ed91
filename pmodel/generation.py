"""Generation with a preallocated KV cache: greedy, temperature, top-k and top-p sampling.

Batched prompts of different lengths are left-padded (pass ``attention_mask``), so every row
writes the same cache slot at each step.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .model import KVCache, Model

__all__ = ["generate", "sample_next"]


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token ``(B,)`` from ``logits`` ``(B, V)``.

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the temperature,
    restricted to the ``top_k`` largest and to the smallest set whose probability reaches
    ``top_p`` (the token that crosses the threshold is kept), then sampled.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0.0:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        srt, idx = x.sort(-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = (cum - srt.softmax(-1)) >= top_p  # mass before this token already reaches top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    probs = x.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: Model, params, prompt_ids, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | Sequence[int] | None = None,
             attention_mask: torch.Tensor | None = None, seed: int | None = None,
             stream: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Generate continuations.

    Args:
      model, params: the model.
      prompt_ids: a list of ints, a ``(T,)`` or a left-padded ``(B, T)`` int64 tensor.
      max_new_tokens: tokens to add.
      temperature, top_k, top_p: sampling (``temperature=0`` is greedy).
      eos_id: stop a row once it emits this id (or any of these ids); finished rows are padded
        with the first eos id; generation stops when every row has finished.
      attention_mask: ``(B, T)`` 1 = token, 0 = left padding.
      seed: seed for sampling (a private generator; global RNG untouched).
      stream: called with each new token column ``(B,)`` as it is produced.

    Returns:
      ``(B, T + n)`` ids (prompt included), ``n <= max_new_tokens``; 1-D in, 1-D out.
    """
    one_d = not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() == 1
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    emb = params["embed"]["weight"]
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"generate: the embedding is a {type(emb).__name__} wrapper; generation runs on "
                        "plain (unsharded) params (KV-cache decoding under tensor parallel is not supported yet)")
    dev = emb.device
    ids = ids.to(dev)
    B, T = ids.shape
    if T == 0:
        raise ValueError("generate: empty prompt (start with at least a BOS token)")
    eos = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
    gen = None
    if seed is not None:
        gen = torch.Generator(device=ids.device).manual_seed(seed)
    cfg = model.config
    dt = emb.dtype
    # KV heads from the weights (a LoRA leaf exposes its base weight's shape), so a model whose
    # weights differ from its config still gets a cache of the right width.
    k_w = params["layers"][0]["attn"]["k_proj"]["weight"]
    kv_heads = getattr(k_w, "shape", (cfg.num_kv_heads * cfg.head_dim,))[0] // cfg.head_dim
    cache = KVCache.allocate(cfg, B, T + max_new_tokens, num_layers=len(params["layers"]),
                             kv_heads=kv_heads, dtype=dt, device=ids.device)
    am = attention_mask.to(ids.device) if attention_mask is not None else None
    logits = model.apply(params, ids, attention_mask=am, cache=cache)[:, -1]
    out = [ids]
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        if eos:
            nxt = torch.where(done, torch.full_like(nxt, eos[0]), nxt)
            done |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
        out.append(nxt[:, None])
        if stream is not None:
            stream(nxt)
        if (eos and bool(done.all())) or step == max_new_tokens - 1:
            break
        step_mask = torch.ones(B, 1, dtype=torch.long, device=ids.device) if am is not None else None
        logits = model.apply(params, nxt[:, None], attention_mask=step_mask, cache=cache)[:, -1]
    res = torch.cat(out, dim=1)
    return res[0] if one_d else res
