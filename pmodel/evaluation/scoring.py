"""Model-side scoring: continuation log-likelihoods with the shared prefix run once, and batched
greedy / sampled generation that stops at stop strings.

Both take token ids (the caller tokenises) and a model with its params: plain, LoRA, or tensor
parallel (:func:`pmodel.parallel.tensor.tensor_parallel` with this rank's params from
``shard_params``; every TP rank calls with the same requests). Under TP each rank's KV cache holds
only its own KV heads, as in :mod:`pmodel.inference`, and the output layer runs only at the
positions scored (a context's last token, the continuation tokens, a generated token), so the
vocab-sharded logits gathered over the TP ranks are ``(rows, positions scored, V)``, never the
whole prompt's.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..model import KVCache, Model
from ..ops.weights import is_wrapper

__all__ = ["LoglikelihoodRequest", "loglikelihood", "loglikelihood_naive", "loglikelihood_rolling", "generate_until",
           "choice_metrics", "pass_at_k"]


@dataclasses.dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuations`` after ``context`` (token ids; the context is non-empty)."""

    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


def _kv_heads(model: Model, params) -> int:
    cfg = model.config
    k_w = params["layers"][0]["attn"]["k_proj"]["weight"]
    return getattr(k_w, "shape", (cfg.num_kv_heads * cfg.head_dim,))[0] // cfg.head_dim


def _device_dtype(params):
    """Device and dtype of the embedding: a tensor, or a weight wrapper (tensor-parallel
    ``VocabParallel``, LoRA) reporting its local tensor's."""
    emb = params["embed"]["weight"]
    if not (isinstance(emb, torch.Tensor) or is_wrapper(emb)):
        raise TypeError(f"evaluation needs the embedding as a tensor or a weight wrapper, got {type(emb).__name__}")
    return emb.device, emb.dtype


def _forward(model: Model, params, ids: torch.Tensor, am: torch.Tensor, cache: KVCache, last: int | None
             ) -> torch.Tensor:
    """``model.apply(params, ids, attention_mask=am, cache=cache)`` with the output layer run only on
    the last ``last`` positions (all when None): logits ``(B, last, V)``."""
    ctx = model.context(ids, attention_mask=am, cache=cache)
    h = model.hidden(params, ids, ctx=ctx, cache=cache)
    if last is not None:
        h = h[:, h.shape[1] - last:]
    return model.head(params, h, ctx)


def _sample(logits: torch.Tensor, temperature: float, top_p: float | None, gen: torch.Generator) -> torch.Tensor:
    """One token from ``logits`` ``(V,)``: temperature, then nucleus (the smallest set of tokens
    whose probability reaches ``top_p``, the crossing token kept), with the row's generator."""
    x = logits.float() / temperature
    if top_p is not None:
        srt, idx = x.sort(descending=True)
        p = srt.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(x.softmax(-1), 1, generator=gen)


def _acc(dt: torch.dtype) -> torch.dtype:
    """Log-softmax precision: at least float32 (float64 models stay float64)."""
    return torch.promote_types(dt, torch.float32)


def _truncate(ctx: Sequence[int], conts: Sequence[Sequence[int]], max_len: int | None):
    """Drop leading context tokens so context + longest continuation fits ``max_len`` tokens of
    input (lm-eval keeps the last ``max_length + 1`` tokens, the last of which is not input)."""
    if max_len is None:
        return list(ctx)
    longest = max(len(c) for c in conts)
    if longest > max_len:
        raise ValueError(f"a continuation of {longest} tokens does not fit the model's {max_len}-token window")
    keep = max_len + 1 - longest
    return list(ctx)[-keep:] if len(ctx) > keep else list(ctx)


@torch.no_grad()
def loglikelihood(model: Model, params, requests: Sequence[LoglikelihoodRequest], *, max_len: int | None = None
                  ) -> list[list[tuple[float, bool]]]:
    """Log-likelihoods of each request's continuations, the requests run as one batch.

    The contexts are left-padded and run once (filling a KV cache); the cache rows are then
    repeated for each continuation, and the continuations (right-padded) run on top of it. So a
    question's shared prompt is computed once however many choices it has; with one-token choices
    no second pass is needed at all.

    Args:
      model, params: the model (plain params).
      requests: :class:`LoglikelihoodRequest` s.
      max_len: the model's window (contexts are cut from the left to fit, as lm-eval does).

    Returns:
      Per request, per continuation: ``(sum of log-probabilities, is_greedy)`` where ``is_greedy``
      says every continuation token is the argmax (lm-eval's second value).
    """
    if not requests:
        return []
    dev, dt = _device_dtype(params)
    ctxs = [_truncate(r.context, r.continuations, max_len) for r in requests]
    if any(len(c) == 0 for c in ctxs):
        raise ValueError("loglikelihood: empty context (start it with a BOS / prefix token)")
    B, Lc = len(ctxs), max(len(c) for c in ctxs)
    M = max(len(c) for r in requests for c in r.continuations)
    if any(len(c) == 0 for r in requests for c in r.continuations):
        raise ValueError("loglikelihood: empty continuation")
    ids = torch.zeros(B, Lc, dtype=torch.long, device=dev)
    am = torch.zeros(B, Lc, dtype=torch.long, device=dev)
    for i, c in enumerate(ctxs):
        ids[i, Lc - len(c):] = torch.tensor(c, dtype=torch.long)
        am[i, Lc - len(c):] = 1
    cache = KVCache.allocate(model.config, B, Lc + max(M - 1, 0), num_layers=len(params["layers"]),
                             kv_heads=_kv_heads(model, params), dtype=dt, device=dev)
    first = _forward(model, params, ids, am, cache, 1)[:, -1].to(_acc(dt)).log_softmax(-1)  # (B, V)
    rows = [i for i, r in enumerate(requests) for _ in r.continuations]
    conts = [c for r in requests for c in r.continuations]
    N = len(conts)
    row_t = torch.tensor(rows, device=dev)
    out_flat: list[tuple[float, bool]] = []
    if M == 1:
        for n, c in enumerate(conts):
            lp = first[rows[n]]
            out_flat.append((float(lp[c[0]]), bool(lp.argmax() == c[0])))
    else:
        # Repeat each context's cache row once per continuation, then run continuation[:-1].
        big = KVCache(k=[k.index_select(0, row_t) for k in cache.k], v=[v.index_select(0, row_t) for v in cache.v],
                      valid=cache.valid.index_select(0, row_t), pos=cache.pos.index_select(0, row_t),
                      length=cache.length)
        toks = torch.zeros(N, M - 1, dtype=torch.long, device=dev)
        cam = torch.zeros(N, Lc + M - 1, dtype=torch.long, device=dev)
        cam[:, :Lc] = am.index_select(0, row_t)
        for n, c in enumerate(conts):
            if len(c) > 1:
                toks[n, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
            cam[n, Lc:Lc + len(c) - 1] = 1
        rest = _forward(model, params, toks, cam, big, None).to(_acc(dt)).log_softmax(-1)  # (N, M-1, V)
        for n, c in enumerate(conts):
            lps = [first[rows[n]]] + [rest[n, j] for j in range(len(c) - 1)]
            total = sum(float(lp[t]) for lp, t in zip(lps, c))
            greedy = all(bool(lp.argmax() == t) for lp, t in zip(lps, c))
            out_flat.append((total, greedy))
    res, k = [], 0
    for r in requests:
        res.append(out_flat[k:k + len(r.continuations)])
        k += len(r.continuations)
    return res


@torch.no_grad()
def loglikelihood_naive(model: Model, params, context: Sequence[int], continuation: Sequence[int]
                        ) -> tuple[float, bool]:
    """The reference: one plain forward over ``context + continuation[:-1]`` (no cache, no padding)."""
    dev, dt = _device_dtype(params)
    full = torch.tensor(list(context) + list(continuation), dtype=torch.long, device=dev)[None]
    lp = model.apply(params, full[:, :-1]).to(_acc(dt)).log_softmax(-1)[0]  # (T-1, V)
    n, T = len(continuation), full.shape[1]
    tgt = full[0, T - n:]
    sel = lp[T - n - 1:T - 1]
    return float(sel.gather(-1, tgt[:, None]).sum()), bool((sel.argmax(-1) == tgt).all())


@torch.no_grad()
def loglikelihood_rolling(model: Model, params, tokens: Sequence[int], *, prefix_id: int, max_len: int
                          ) -> float:
    """Log-likelihood of a whole text (lm-eval ``loglikelihood_rolling``): disjoint windows of
    ``max_len`` predicted tokens, each conditioned on up to ``max_len`` tokens before it (the first
    on ``prefix_id``), as lm-eval's ``get_rolling_token_windows(..., context_len=1)``."""
    dev, dt = _device_dtype(params)
    seq = [prefix_id] + list(tokens)
    total = 0.0
    start = 1
    while start < len(seq):
        end = min(start + max_len, len(seq))
        lo = max(0, end - max_len - 1)
        window = torch.tensor(seq[lo:end], dtype=torch.long, device=dev)[None]
        lp = model.apply(params, window[:, :-1]).to(_acc(dt)).log_softmax(-1)[0]
        n = end - start
        tgt = window[0, -n:]
        total += float(lp[-n:].gather(-1, tgt[:, None]).sum())
        start = end
    return total


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """lm-eval's multiple-choice metrics: ``acc`` (argmax log-likelihood) and ``acc_norm`` (argmax of
    log-likelihood divided by the choice's length in characters). Ties go to the first index, as
    ``numpy.argmax``."""
    def argmax(xs):
        best = 0
        for i, x in enumerate(xs):
            if x > xs[best]:
                best = i
        return best
    pred = argmax(list(lls))
    norm = argmax([ll / float(len(c)) for ll, c in zip(lls, choices)])
    return {"pred": pred, "pred_norm": norm, "acc": float(pred == gold), "acc_norm": float(norm == gold)}


@torch.no_grad()
def generate_until(model: Model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   decode, stop: Sequence[str] = (), eos_ids: Sequence[int] = (), temperature: float = 0.0,
                   top_p: float | None = None, seeds: Sequence[int] | None = None, max_len: int | None = None
                   ) -> list[str]:
    """Generate for a batch of prompts until a stop string, an EOS id or ``max_new_tokens``.

    Prompts are left-padded and decoded together with a KV cache; a row stops when its decoded text
    contains a stop string (checked every step, so a stop string split across tokens is caught) or
    when it emits an EOS id. Greedy rows do not depend on the batch they are in beyond float
    rounding; sampled rows use one generator per row (``seeds``), so a row's sample does not depend
    on the other rows.

    Args:
      model, params: the model.
      prompts: token ids per prompt (non-empty).
      max_new_tokens: at most this many new tokens per row.
      decode: ``ids -> text`` (the tokenizer's decode).
      stop: stop strings; the returned text ends before the first one.
      eos_ids: ids that end a row (not included in the text).
      temperature, top_p: sampling (``temperature == 0``: greedy).
      seeds: one seed per row when sampling.
      max_len: the model's window; prompts are cut from the left to leave room for the new tokens.

    Returns:
      The generated text per prompt, cut at the first stop string.
    """
    from .tasks import truncate_at_stop
    dev, dt = _device_dtype(params)
    B = len(prompts)
    if B == 0:
        return []
    ps = [list(p) for p in prompts]
    if max_len is not None:
        if max_new_tokens >= max_len:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the {max_len}-token window")
        ps = [p[-(max_len - max_new_tokens):] for p in ps]
    if any(not p for p in ps):
        raise ValueError("generate_until: empty prompt")
    T = max(len(p) for p in ps)
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    am = torch.zeros(B, T, dtype=torch.long, device=dev)
    for i, p in enumerate(ps):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        am[i, T - len(p):] = 1
    gens = None
    if temperature > 0:
        if seeds is None or len(seeds) != B:
            raise ValueError("sampling needs one seed per prompt")
        gens = [torch.Generator(device=dev).manual_seed(int(s)) for s in seeds]
    cache = KVCache.allocate(model.config, B, T + max_new_tokens, num_layers=len(params["layers"]),
                             kv_heads=_kv_heads(model, params), dtype=dt, device=dev)
    logits = _forward(model, params, ids, am, cache, 1)[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    eos = set(int(e) for e in eos_ids)
    for step in range(max_new_tokens):
        if gens is None:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.cat([_sample(logits[i], temperature, top_p, gens[i]) for i in range(B)])
        for i in range(B):
            if done[i]:
                continue
            t = int(nxt[i])
            if t in eos:
                done[i] = True
                continue
            out[i].append(t)
            if stop and any(s in decode(out[i]) for s in stop):
                done[i] = True
        if all(done) or step == max_new_tokens - 1:
            break
        step_mask = torch.ones(B, 1, dtype=torch.long, device=dev)
        logits = model.apply(params, nxt[:, None], attention_mask=step_mask, cache=cache)[:, -1]
    return [truncate_at_stop(decode(o), stop) for o in out]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of the Codex paper (Chen et al., 2021; human-eval
    ``estimate_pass_at_k``): ``1 - C(n - c, k) / C(n, k)`` for ``n`` samples of which ``c`` pass."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod

