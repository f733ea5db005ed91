"""Sampling: the settings of one generation and the logits processing they imply.

:class:`SamplingConfig` holds every knob of token selection; :func:`process_logits` applies the
penalties and warpers in the order Hugging Face ``generate`` and vLLM use (penalties, then
temperature, top-k, top-p, min-p) and :func:`select` picks the next token (argmax when
``temperature == 0``, else a draw from a private, seeded generator).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

__all__ = ["SamplingConfig", "PenaltyState", "process_logits", "select", "sample_next"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
      temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
      top_k: keep the k most likely tokens (None = off).
      top_p: keep the smallest set whose probability reaches p; the token that crosses the
        threshold is kept (None = off).
      min_p: keep tokens whose probability is at least ``min_p`` times the most likely one's
        (after temperature; None = off).
      repetition_penalty: CTRL / HF penalty on every token already in the row (prompt included):
        a positive logit is divided by it, a negative one multiplied (1.0 = off).
      presence_penalty: OpenAI-style: subtracted once from the logit of every token already
        generated (prompt excluded, as vLLM and OpenAI do); 0 = off.
      frequency_penalty: OpenAI-style: subtracted once per earlier occurrence in the generated
        tokens; 0 = off.
      seed: seed of the private sampling generator (the global RNG is never touched); None =
        a fresh nondeterministic seed.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be positive (or None), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (the OpenAI range), got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def generator(self, device) -> torch.Generator | None:
        """The private generator of a sampling run (None for greedy)."""
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g


class PenaltyState:
    """Per-row token bookkeeping for the penalties: ``seen`` (prompt + generated, for the
    repetition penalty) and ``counts`` (generated only, for presence / frequency).

    Args:
      prompt: ``(B, T)`` ids; ``attention_mask`` ``(B, T)`` excludes left padding.
      vocab: the logits width.
    """

    def __init__(self, prompt: torch.Tensor, vocab: int, attention_mask: torch.Tensor | None = None):
        B = prompt.shape[0]
        valid = torch.ones_like(prompt) if attention_mask is None else attention_mask.to(prompt.device).long()
        # scatter_add then > 0: a padded slot holding the same id as a real token cannot unset it
        hits = torch.zeros(B, vocab, dtype=torch.long, device=prompt.device)
        self.seen = hits.scatter_add_(1, prompt.clamp(0, vocab - 1), valid) > 0
        self.counts = torch.zeros(B, vocab, dtype=torch.float32, device=prompt.device)

    def update(self, tokens: torch.Tensor) -> None:
        """Record the tokens ``(B,)`` just chosen."""
        idx = tokens[:, None]
        self.seen.scatter_(1, idx, True)
        self.counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=self.counts.dtype))

    def reorder(self, rows: torch.Tensor) -> None:
        """Rows follow a reordering (beam search)."""
        self.seen = self.seen.index_select(0, rows)
        self.counts = self.counts.index_select(0, rows)


def apply_penalties(logits: torch.Tensor, cfg: SamplingConfig, state: PenaltyState | None) -> torch.Tensor:
    """The penalties of ``cfg`` on fp32 ``logits`` ``(B, V)``."""
    if state is None or not cfg.penalised:
        return logits
    if cfg.repetition_penalty != 1.0:
        p = cfg.repetition_penalty
        pen = torch.where(logits > 0, logits / p, logits * p)
        logits = torch.where(state.seen, pen, logits)
    if cfg.frequency_penalty:
        logits = logits - cfg.frequency_penalty * state.counts
    if cfg.presence_penalty:
        logits = logits - cfg.presence_penalty * (state.counts > 0).to(logits.dtype)
    return logits


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, state: PenaltyState | None = None) -> torch.Tensor:
    """Penalties, temperature, top-k, top-p and min-p on ``logits`` ``(B, V)`` -> fp32 scores
    whose softmax is the sampling distribution (masked tokens are ``-inf``)."""
    x = apply_penalties(logits.float(), cfg, state)
    if cfg.greedy:
        return x
    x = x / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        srt, idx = x.sort(-1, descending=True)
        probs = srt.softmax(-1)
        drop = (probs.cumsum(-1) - probs) >= cfg.top_p  # mass before this token already reaches top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    if cfg.min_p is not None and cfg.min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return x


def select(scores: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The next token ``(B,)`` from processed ``scores`` ``(B, V)``."""
    if cfg.greedy:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token ``(B,)`` from ``logits`` ``(B, V)`` (no penalties): the one-call form
    of :func:`process_logits` + :func:`select`."""
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return select(process_logits(logits, cfg), cfg, generator)


def stop_ids(eos: int | Sequence[int] | None) -> list[int]:
    """``eos`` as a list of ids."""
    if eos is None:
        return []
    if isinstance(eos, int):
        return [eos]
    return [int(i) for i in eos]
