"""The generation loop: prompts in, token columns / texts / streamed deltas out.

* :class:`GenerationConfig` — every setting of one generation (length, sampling, stops, beams).
* :func:`left_pad` — prompts of different lengths as one left-padded batch.
* :class:`TokenGenerator` — iterate to get one token per row per step; rows stop on their
  stop ids, their length cap, or when the caller calls :meth:`TokenGenerator.finish`.
* :func:`generate_ids` — the whole run as a ``(B, T + n)`` tensor (greedy / sampling / beams).
* :func:`stream` / :func:`complete` — text: deltas as they are produced (multi-byte characters
  never split, stop strings cut), or whole completions with their finish reason.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import torch

from ..model import Model
from .decode import Decoder
from .sampling import PenaltyState, SamplingConfig, process_logits, select
from .text import Detokenizer, StopMatcher

__all__ = ["GenerationConfig", "TokenGenerator", "left_pad", "generate_ids", "stream", "complete",
           "Completion", "Delta", "context_limit", "check_fits"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Settings of one generation.

    Attributes:
      max_new_tokens: new tokens per row at most.
      max_length: prompt + new tokens at most (None = the model's ``max_position_embeddings``);
        a prompt that leaves no room is refused with its length and the limit.
      temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
        seed: token selection (see :class:`~pmodel.inference.sampling.SamplingConfig`).
      stop_ids: a row ends when it emits one of these (its EOS, a chat template's end marker).
      stop_strings: a row ends when its text contains one; the text returned ends before it.
      num_beams: > 1 runs beam search (Hugging Face's algorithm: equal tokens), greedy only.
      length_penalty, early_stopping: beam search settings (``early_stopping``: True, False or
        ``"never"``, as in transformers).
      num_return_sequences: beams returned per prompt (<= num_beams).
    """

    max_new_tokens: int = 64
    max_length: int | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def __post_init__(self):
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], "
                             f"got {self.num_return_sequences}")
        if self.num_beams > 1 and self.temperature > 0:
            raise NotImplementedError("beam search with sampling (num_beams > 1 and temperature > 0) is not "
                                      "implemented; use one of them")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        self.sampling  # validates the sampling fields

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, seed=self.seed)

    def replace(self, **kw) -> "GenerationConfig":
        return dataclasses.replace(self, **kw)


def context_limit(model: Model, cfg: GenerationConfig) -> int:
    """Prompt + new tokens at most: ``cfg.max_length`` or the model's context (and never past the
    model's ``position_limit``)."""
    limit = cfg.max_length or model.config.max_position_embeddings
    pl = model.config.position_limit
    return min(limit, pl) if pl is not None else limit


def left_pad(prompts, pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (lists of ids, or a ``(T,)`` / ``(B, T)`` tensor) -> ``(ids, attention_mask)``,
    both ``(B, T)``, left-padded with ``pad_id`` (mask 0 on padding)."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts if prompts.dim() == 2 else prompts[None]
        return ids.long().to(device), torch.ones_like(ids, dtype=torch.long, device=device)
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    am = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        am[i, T - len(r):] = 1
    return ids.to(device), am.to(device)


def check_fits(model: Model, ids: torch.Tensor, attention_mask: torch.Tensor | None, cfg: GenerationConfig):
    """``(limit, real_lengths (B,))``; raises when a prompt leaves no room for a new token."""
    B, T = ids.shape
    limit = context_limit(model, cfg)
    if attention_mask is not None:
        real = attention_mask.sum(1).to(ids.device)
    else:
        real = torch.full((B,), T, device=ids.device)
    too_long = [(i, int(n)) for i, n in enumerate(real.tolist()) if n >= limit]
    if too_long:
        i, n = too_long[0]
        src = "max_length" if cfg.max_length else "the model's max_position_embeddings"
        more = f" ({len(too_long)} prompts are too long)" if len(too_long) > 1 else ""
        raise ValueError(f"prompt {i} has {n} tokens; the context holds {limit} ({src}), leaving no room for "
                         f"a new token: shorten the prompt{more}")
    return limit, real


class TokenGenerator:
    """Greedy / sampled decoding of a left-padded batch, one token column per iteration.

    Args:
      model, params: the model.
      ids, attention_mask: ``(B, T)`` left-padded prompts (mask None = no padding).
      cfg: the :class:`GenerationConfig` (``num_beams`` must be 1 here).
      fast: the :class:`~pmodel.inference.decode.Decoder` step choice.

    Iterating yields ``(B,)`` tokens; a finished row keeps yielding its first stop id (or 0) and
    :attr:`finished` / :attr:`reasons` say which rows ended and why (``"stop"``: a stop id or the
    caller's :meth:`finish`; ``"length"``: ``max_new_tokens`` or the context limit).
    """

    def __init__(self, model: Model, params, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cfg: GenerationConfig, *, fast: bool | str = "auto"):
        if cfg.num_beams != 1:
            raise ValueError("TokenGenerator decodes one sequence per row; beam search runs in generate_ids")
        self.cfg = cfg
        B, T = ids.shape
        limit, real = check_fits(model, ids, attention_mask, cfg)
        self.budget = (limit - real).clamp(max=cfg.max_new_tokens).to(ids.device)  # (B,) new tokens allowed
        n = int(self.budget.max())
        self.decoder = Decoder(model, params, batch=B, max_len=T + n, fast=fast)
        self.ids, self.mask = ids, attention_mask
        self.sampling = cfg.sampling
        self.gen = self.sampling.generator(ids.device)
        self.state = PenaltyState(ids, model.config.vocab_size, attention_mask) if self.sampling.penalised else None
        self.stop = torch.tensor(cfg.stop_ids, dtype=torch.long, device=ids.device)
        self.fill = cfg.stop_ids[0] if cfg.stop_ids else 0
        self.finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
        self.reasons: list[str | None] = [None] * B
        self._open = B
        self.count = 0
        self._logits = None

    def finish(self, row: int, reason: str = "stop") -> None:
        """End ``row`` now (e.g. its text hit a stop string)."""
        if self.reasons[row] is None:
            self.finished[row] = True
            self.reasons[row] = reason
            self._open -= 1

    @property
    def done(self) -> bool:
        return self._open == 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._logits is None:
            self._logits = self.decoder.prefill(self.ids, self.mask)
        # Per-token bookkeeping in Python on one host copy of the column: the stop / length
        # checks cost no tensor ops (a batch of rows is small next to a vocabulary).
        stops = set(self.cfg.stop_ids)
        budget = self.budget.tolist()
        first_cap = min(budget)
        plain = self.sampling.greedy and self.state is None
        while not self.done:
            if plain:
                tok = self._logits.argmax(-1)
            else:
                tok = select(process_logits(self._logits, self.sampling, self.state), self.sampling, self.gen)
            if self._any_finished:
                tok = torch.where(self.finished, torch.full_like(tok, self.fill), tok)
            self.count += 1
            if stops or self.count >= first_cap:
                for r, t in enumerate(tok.tolist()):
                    if self.reasons[r] is None:
                        if t in stops:
                            self.finish(r, "stop")
                        elif budget[r] <= self.count:
                            self.finish(r, "length")
            if self.state is not None:
                self.state.update(tok)
            yield tok
            if self.done:
                break
            self._logits = self.decoder.step(tok)

    @property
    def _any_finished(self) -> bool:
        return any(r is not None for r in self.reasons)


def generate_ids(model: Model, params, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 cfg: GenerationConfig, *, fast: bool | str = "auto", tokenizer=None) -> torch.Tensor:
    """``(B, T + n)`` ids, prompt included (beam search: ``(B * num_return_sequences, T + n)``).

    Rows that stopped early are filled with the first stop id (0 without one). Stop strings need
    ``tokenizer``; a row ends on the token that completes its stop string (the ids keep that
    token; :func:`complete` returns the text cut before the string).
    """
    if cfg.num_beams > 1:
        from .beam import beam_search
        if cfg.stop_strings:
            raise NotImplementedError("stop strings with beam search are not supported (stop ids are)")
        return beam_search(model, params, ids, attention_mask, cfg, fast=fast)
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer (to read the text)")
    run = TokenGenerator(model, params, ids, attention_mask, cfg, fast=fast)
    texts = _RowTexts(tokenizer, ids, attention_mask, cfg) if cfg.stop_strings else None
    cols = []
    for tok in run:
        cols.append(tok)
        if texts is not None:
            texts.push(tok, run)
    return torch.cat([ids] + [c[:, None] for c in cols], dim=1)


class _RowTexts:
    """Per-row detokenizers and stop-string matchers that end rows through ``run.finish``."""

    def __init__(self, tokenizer, ids, attention_mask, cfg: GenerationConfig):
        B = ids.shape[0]
        ctx = [ids[i][attention_mask[i].bool()].tolist() if attention_mask is not None else ids[i].tolist()
               for i in range(B)]
        self.detok = [Detokenizer(tokenizer, c, skip_ids=cfg.stop_ids) for c in ctx]
        self.stops = [StopMatcher(cfg.stop_strings) for _ in range(B)]
        self.live = [True] * B
        self.tokens: list[list[int]] = [[] for _ in range(B)]

    def push(self, tok: torch.Tensor, run: TokenGenerator) -> list[str]:
        """Feed the new column; returns each row's new visible text."""
        out = []
        for r, t in enumerate(tok.tolist()):
            if not self.live[r]:
                out.append("")
                continue
            self.tokens[r].append(t)
            text, hit = self.stops[r].push(self.detok[r].push(t))
            if hit:
                run.finish(r, "stop")
            if bool(run.finished[r]):
                self.live[r] = False
                if not hit:  # ended by a stop id or the length cap: release the held text
                    rest, _ = self.stops[r].push(self.detok[r].flush())
                    text += rest + self.stops[r].flush()
            out.append(text)
        return out


@dataclasses.dataclass
class Delta:
    """One row's new output in a :func:`stream` step.

    Attributes:
      index: the row (prompt) index.
      text: new text (possibly ''), never part of a character, never part of a stop string.
      token_ids: the ids produced at this step for this row (empty once the row has finished).
      finish_reason: None while running, then ``"stop"`` or ``"length"``.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """A finished row: its text, ids (stop id excluded), the finish reason and token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int


def _encode_prompts(tokenizer, prompts, device):
    rows = []
    for p in prompts:
        if isinstance(p, str):
            rows.append(tokenizer.encode(p, bos=tokenizer.add_bos))
        else:
            rows.append([int(i) for i in p])
    pad = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else 0
    return rows, left_pad(rows, pad, device)


def stream(model: Model, params, tokenizer, prompts: Sequence, cfg: GenerationConfig, *,
           fast: bool | str = "auto") -> Iterator[list[Delta]]:
    """Generate for a batch of prompts (texts, encoded with BOS, or id lists) and yield, per
    step, one :class:`Delta` per row that is still running or has just finished.

    The texts of a row's deltas concatenate to its completion text: stop ids are not decoded,
    the text ends before the first stop string, and a multi-byte character (byte-fallback or
    byte-level pieces) is emitted whole once its last byte arrives.
    """
    if cfg.num_beams != 1:
        raise ValueError("stream: beam search (num_beams > 1) has no incremental output; use complete()")
    device = params["embed"]["weight"].device
    rows, (ids, am) = _encode_prompts(tokenizer, prompts, device)
    run = TokenGenerator(model, params, ids, am, cfg, fast=fast)
    texts = _RowTexts(tokenizer, ids, am, cfg)
    reported = [False] * len(rows)
    for tok in run:
        live = list(texts.live)
        new = texts.push(tok, run)
        out = []
        for r in range(len(rows)):
            if not live[r] or reported[r]:
                continue
            t = tok[r].item()
            fin = run.reasons[r] if bool(run.finished[r]) else None
            keep = [] if (fin == "stop" and t in cfg.stop_ids) else [t]
            out.append(Delta(index=r, text=new[r], token_ids=keep, finish_reason=fin))
            reported[r] = fin is not None
        if out:
            yield out


def complete(model: Model, params, tokenizer, prompts: Sequence, cfg: GenerationConfig, *,
             fast: bool | str = "auto") -> list[Completion]:
    """Whole completions for a batch of prompts (texts or id lists); beam search included
    (``num_beams > 1``: the best ``num_return_sequences`` per prompt, in order; beams are scored
    on ids, so there a stop string only cuts the returned text)."""
    device = params["embed"]["weight"].device
    rows, (ids, am) = _encode_prompts(tokenizer, prompts, device)
    if cfg.num_beams > 1:
        # Beams are scored on ids (a stop id ends a beam); a stop string cuts the returned text.
        out = generate_ids(model, params, ids, am, cfg.replace(stop_strings=()), fast=fast)
        res = []
        for j in range(out.shape[0]):
            r = j // cfg.num_return_sequences
            gen = out[j, ids.shape[1]:].tolist()
            reason = "length"
            for k, t in enumerate(gen):
                if t in cfg.stop_ids:
                    gen, reason = gen[:k], "stop"
                    break
            d = Detokenizer(tokenizer, rows[r])  # the prompt places the first word boundary
            text = "".join(d.push(t) for t in gen) + d.flush()
            cuts = [text.find(x) for x in cfg.stop_strings if x in text]
            if cuts:
                text, reason = text[: min(cuts)], "stop"
            res.append(Completion(text=text, token_ids=gen, finish_reason=reason, prompt_tokens=len(rows[r])))
        return res
    texts = [""] * len(rows)
    toks: list[list[int]] = [[] for _ in rows]
    reasons: list[str] = ["length"] * len(rows)
    for deltas in stream(model, params, tokenizer, prompts, cfg, fast=fast):
        for d in deltas:
            texts[d.index] += d.text
            toks[d.index] += d.token_ids
            if d.finish_reason:
                reasons[d.index] = d.finish_reason
    return [Completion(text=t, token_ids=k, finish_reason=f, prompt_tokens=len(r))
            for t, k, f, r in zip(texts, toks, reasons, rows)]
