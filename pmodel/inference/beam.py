"""Beam search, step for step the algorithm of Hugging Face ``generate(num_beams=...)``.

Per prompt, ``num_beams`` running beams and ``num_beams`` finished hypotheses. Each step scores
every continuation ``running score + log p(token)``, keeps the top ``max(2, 1 + #stop ids) *
num_beams`` candidates, moves candidates that end (a stop id, or the length cap) among the top
``num_beams`` into the finished set (score divided by ``generated_length ** length_penalty``)
and continues with the best ``num_beams`` that did not end. It stops when no running beam can
beat the worst finished one (the ``early_stopping`` heuristics of transformers: False /
True / ``"never"``), when every candidate ends, or at the length cap. The KV cache rows follow
the surviving beams (:meth:`~pmodel.inference.decode.Decoder.reorder`).
"""
from __future__ import annotations

import torch

from ..model import Model
from .decode import Decoder
from .engine import GenerationConfig, check_fits
from .sampling import PenaltyState, apply_penalties

__all__ = ["beam_search"]

_NEG = -1.0e9


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b, j]]`` along dim 1 (``t`` ``(B, K, ...)``, ``idx`` ``(B, J)``)."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


@torch.no_grad()
def beam_search(model: Model, params, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                cfg: GenerationConfig, *, fast: bool | str = "auto") -> torch.Tensor:
    """Beam search over a left-padded batch.

    Returns:
      ``(B * num_return_sequences, T + n)``: for each prompt its best ``num_return_sequences``
      hypotheses, best first; positions after a hypothesis' stop id hold the first stop id (0
      without one); ``n`` is the longest returned generation.
    """
    B, T = ids.shape
    nb = cfg.num_beams
    limit, real = check_fits(model, ids, attention_mask, cfg)
    n = min(cfg.max_new_tokens, int((limit - real).min()))
    max_length = T + n
    dev = ids.device
    stops = torch.tensor(cfg.stop_ids, dtype=torch.long, device=dev)
    fill = cfg.stop_ids[0] if cfg.stop_ids else 0
    keep = max(2, 1 + len(cfg.stop_ids)) * nb
    top_mask = torch.arange(keep, device=dev) < nb  # (K,) only the top num_beams may finish
    lp_pow = cfg.length_penalty

    dec = Decoder(model, params, batch=B, max_len=max_length, fast=fast)
    logits = dec.prefill(ids, attention_mask)  # (B, V)
    expand = torch.arange(B, device=dev).repeat_interleave(nb)
    dec.reorder(expand)
    logits = logits.index_select(0, expand)  # (B*nb, V)
    samp = cfg.sampling
    state = None
    if samp.penalised:
        state = PenaltyState(ids, model.config.vocab_size, attention_mask)
        state.reorder(expand)

    running = torch.full((B, nb, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, :T] = ids[:, None]
    seqs = running.clone()
    run_scores = torch.zeros(B, nb, device=dev)
    run_scores[:, 1:] = _NEG  # the beams start identical: expand only the first
    fin_scores = torch.full((B, nb), _NEG, device=dev)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)
    finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    offs = torch.arange(B, device=dev)[:, None] * nb
    cur = T
    while True:
        lp = torch.log_softmax(logits.float(), dim=-1)  # (B*nb, V)
        lp = apply_penalties(lp, samp, state)
        V = lp.shape[-1]
        acc = (lp.view(B, nb, V) + run_scores[:, :, None]).view(B, nb * V)
        top_v, top_i = torch.topk(acc, keep)  # (B, K)
        src, tok = top_i // V, top_i % V
        cand = _gather(running, src)  # (B, K, max_length)
        cand[:, :, cur] = tok
        hits = torch.isin(tok, stops) if len(cfg.stop_ids) else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_length:
            hits = torch.ones_like(hits)
        # the next running beams: the best candidates that did not end
        masked = top_v + hits.float() * _NEG
        nxt = torch.topk(masked, nb).indices  # (B, nb)
        running, run_scores, run_src = _gather(cand, nxt), _gather(masked, nxt), _gather(src, nxt)
        # finished hypotheses: the ones that just ended among the top nb, if they beat the kept ones
        just = hits & top_mask[None]
        sc = top_v / float((cur + 1 - T) ** lp_pow)
        full = finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
        sc = sc + full.float() * _NEG + (~improvable).float() * _NEG + (~just).float() * _NEG
        m_idx = torch.topk(torch.cat((fin_scores, sc), 1), nb).indices
        seqs = _gather(torch.cat((seqs, cand), 1), m_idx)
        fin_scores = _gather(torch.cat((fin_scores, sc), 1), m_idx)
        fin_len = _gather(torch.cat((fin_len, torch.full_like(tok, cur + 1 - T)), 1), m_idx)
        finished = _gather(torch.cat((finished, just), 1), m_idx)
        cur += 1
        # can a running beam still beat the worst finished hypothesis?
        best_len = (max_length - T) if (cfg.early_stopping == "never" and lp_pow > 0.0) else (cur - T)
        best_running = run_scores[:, :1] / float(best_len ** lp_pow)
        worst = torch.where(finished, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, _NEG))
        improvable = improvable & (best_running > worst).any(-1, keepdim=True)
        go_on = bool(improvable.any()) and not (bool(finished.all()) and cfg.early_stopping is True) \
            and not bool(hits.all())
        if not go_on:
            break
        rows = (offs + run_src).view(-1)
        dec.reorder(rows)
        nxt_tok = running[:, :, cur - 1].reshape(-1)
        if state is not None:
            state.reorder(rows)
            state.update(nxt_tok)
        logits = dec.step(nxt_tok)
    k = cfg.num_return_sequences
    out = seqs[:, :k].reshape(B * k, max_length)
    width = T + int(fin_len[:, :k].max())
    return out[:, :width]
