"""``pmodel.generate``: one call from prompt ids to generated ids.

The machinery (KV-cached decoder, sampling, beam search, streaming text, chat, serving) lives
in :mod:`pmodel.inference`; this module keeps the function entry point (a function, so it is
not named like a module).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .inference.engine import GenerationConfig, TokenGenerator, generate_ids
from .inference.sampling import sample_next, stop_ids
from .model import Model

__all__ = ["generate", "sample_next"]


@torch.no_grad()
def generate(model: Model, params, prompt_ids, *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             eos_id: int | Sequence[int] | None = None, stop_strings: Sequence[str] = (), tokenizer=None,
             max_length: int | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, num_return_sequences: int = 1,
             attention_mask: torch.Tensor | None = None, seed: int | None = None,
             stream: Callable[[torch.Tensor], None] | None = None, fast: bool | str = "auto") -> torch.Tensor:
    """Generate continuations.

    Args:
      model, params: the model (plain, LoRA-wrapped or tensor parallel: under TP every rank
        calls this with its shards and gets the same ids).
      prompt_ids: a list of ints, a ``(T,)`` tensor, a left-padded ``(B, T)`` tensor (pass
        ``attention_mask``), or a list of id lists of different lengths (left-padded here).
      max_new_tokens: tokens to add at most; ``max_length``: prompt + new at most (default the
        model's ``max_position_embeddings``; a prompt that does not fit raises ValueError).
      temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty:
        token selection (``temperature=0`` is greedy), see
        :class:`~pmodel.inference.sampling.SamplingConfig`.
      eos_id: stop a row once it emits this id (or any of these ids); finished rows are padded
        with the first one; generation stops when every row has finished.
      stop_strings, tokenizer: also stop a row when its decoded text contains one of these.
      num_beams, length_penalty, early_stopping, num_return_sequences: beam search (greedy), as
        transformers' ``generate``; returns ``num_return_sequences`` rows per prompt.
      attention_mask: ``(B, T)`` 1 = token, 0 = left padding.
      seed: seed for sampling (a private generator; global RNG untouched).
      stream: called with each new token column ``(B,)`` as it is produced (not with beams).
      fast: the decode step (``"auto"``: prepared fast step when the model allows, see
        :class:`~pmodel.inference.decode.Decoder`).

    Returns:
      ``(B, T + n)`` ids (prompt included), ``n <= max_new_tokens``; 1-D in, 1-D out.
    """
    if isinstance(prompt_ids, torch.Tensor):
        one_d = prompt_ids.dim() == 1
    else:  # a list of ids (one prompt) or a list of id lists (a batch)
        one_d = len(prompt_ids) == 0 or not isinstance(prompt_ids[0], (list, tuple, torch.Tensor))
    emb = params["embed"]["weight"]
    dev = emb.device
    if isinstance(prompt_ids, torch.Tensor) or one_d:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=dev)
        if ids.dim() == 1:
            ids = ids[None]
        am = attention_mask.to(dev) if attention_mask is not None else None
    else:
        from .inference.engine import left_pad
        ids, am = left_pad([list(map(int, p)) for p in prompt_ids], 0, dev)
        if attention_mask is not None:
            raise ValueError("generate: attention_mask is for a padded tensor; lists of prompts are padded here")
    if ids.shape[1] == 0:
        raise ValueError("generate: empty prompt (start with at least a BOS token)")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, max_length=max_length, temperature=temperature, top_k=top_k,
                           top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                           presence_penalty=presence_penalty, frequency_penalty=frequency_penalty, seed=seed,
                           stop_ids=tuple(stop_ids(eos_id)), stop_strings=tuple(stop_strings), num_beams=num_beams,
                           length_penalty=length_penalty, early_stopping=early_stopping,
                           num_return_sequences=num_return_sequences)
    if stream is not None:
        if num_beams > 1:
            raise ValueError("generate: stream= is called per token column; beam search has none (num_beams > 1)")
        if stop_strings:
            raise ValueError("generate: use pmodel.inference.stream for text streaming with stop strings")
        run = TokenGenerator(model, params, ids, am, cfg, fast=fast)
        cols = []
        for tok in run:
            cols.append(tok[:, None])
            stream(tok)
        res = torch.cat([ids] + cols, dim=1)
    else:
        res = generate_ids(model, params, ids, am, cfg, fast=fast, tokenizer=tokenizer)
    return res[0] if one_d and res.shape[0] == 1 else res
