"""Batches for ``model.loss(params, batch)`` and a resumable micro-batch loader.

Batch keys (torch tensors):

* ``tokens`` (B, T) int64, ``labels`` (B, T) int64 already shifted (-100 where ignored),
  ``loss_mask`` (B, T) float32;
* ``position_ids`` (B, T) int64, restarting at 0 for every packed sample;
* ``cu_seqlens`` (N+1,) int32: cumulative lengths of the sequences over the flattened B*T
  tokens (padding forms its own sequences), as flash-attention varlen takes them;
* ``attention_mask`` (B, T) int64: 1 real token, 0 padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from .templates import IGNORE_INDEX

__all__ = ["CollatorConfig", "collate", "MicroBatchLoader"]


@dataclass(frozen=True, kw_only=True)
class CollatorConfig:
    """How examples become a batch.

    Args:
        seq_length: pad every row to this length (``None``: to the longest row, rounded up to
            ``pad_to_multiple_of``).
        pad_id: token id written in padding (its label is -100 and loss_mask 0).
        padding_side: ``right`` or ``left``.
        pad_to_multiple_of: rounding of the padded length when ``seq_length`` is None.
        truncate: cut rows longer than ``seq_length`` instead of raising.
    """

    seq_length: int | None = None
    pad_id: int = 0
    padding_side: str = "right"
    pad_to_multiple_of: int = 1
    truncate: bool = False

    def __post_init__(self):
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.seq_length is not None and self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")
        if self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")


def collate(examples: Sequence[dict[str, np.ndarray]], config: CollatorConfig = CollatorConfig()) -> dict[str, torch.Tensor]:
    """Pad and stack examples into a batch.

    Args:
        examples: dicts with ``tokens``, ``labels`` (shifted), optional ``loss_mask``,
            ``position_ids`` and ``seq_lens`` (packed sample lengths).
        config: :class:`CollatorConfig`.

    Returns:
        The batch dict (see the module docstring).
    """
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    lens = [len(e["tokens"]) for e in examples]
    if config.seq_length is not None:
        T = config.seq_length
        if max(lens) > T and not config.truncate:
            raise ValueError(f"example of length {max(lens)} exceeds seq_length {T} (set truncate=True to cut)")
    else:
        m = config.pad_to_multiple_of
        T = -(-max(lens) // m) * m
    B = len(examples)
    tokens = np.full((B, T), config.pad_id, dtype=np.int64)  # (B, T)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)  # (B, T)
    loss_mask = np.zeros((B, T), dtype=np.float32)  # (B, T)
    position_ids = np.zeros((B, T), dtype=np.int64)  # (B, T)
    attention_mask = np.zeros((B, T), dtype=np.int64)  # (B, T)
    cu = [0]
    for b, e in enumerate(examples):
        n = min(len(e["tokens"]), T)
        seq_lens = [int(x) for x in e.get("seq_lens", [len(e["tokens"])])]
        if n < len(e["tokens"]):  # truncated: cut the sample lengths too
            kept, total = [], 0
            for s in seq_lens:
                if total + s >= n:
                    kept.append(n - total)
                    break
                kept.append(s)
                total += s
            seq_lens = [s for s in kept if s > 0]
        lab = np.asarray(e["labels"][:n], dtype=np.int64)
        lm = np.asarray(e["loss_mask"][:n], dtype=np.float32) if "loss_mask" in e \
            else (lab != IGNORE_INDEX).astype(np.float32)
        pos = np.asarray(e["position_ids"][:n], dtype=np.int64) if "position_ids" in e \
            else np.concatenate([np.arange(s) for s in seq_lens]).astype(np.int64)
        sl = slice(0, n) if config.padding_side == "right" else slice(T - n, T)
        tokens[b, sl] = e["tokens"][:n]
        labels[b, sl] = np.where(lm > 0, lab, IGNORE_INDEX)
        loss_mask[b, sl] = lm
        position_ids[b, sl] = pos
        attention_mask[b, sl] = 1
        row = ([T - n] if config.padding_side == "left" and n < T else []) + seq_lens + \
              ([T - n] if config.padding_side == "right" and n < T else [])
        for s in row:
            cu.append(cu[-1] + s)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "position_ids": torch.from_numpy(position_ids),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "attention_mask": torch.from_numpy(attention_mask),
    }


class MicroBatchLoader:
    """Resumable, deterministic micro-batches over a dataset with ``sample(i)``.

    Follows Megatron's pretraining sampler: global batch ``g`` (of ``micro_batch_size *
    num_micro_batches * dp_size`` samples) starts at sample ``start + g * global_batch``; within
    it, micro-batch ``m`` of data-parallel rank ``r`` holds samples ``[base + (m*dp + r)*mbs,
    ... + mbs)``. Resuming = building the loader with ``start=consumed_samples``.

    Iterating yields one list of ``num_micro_batches`` batches per optimizer step.

    Args:
        dataset: object with ``sample(i)`` and optionally ``len()``.
        micro_batch_size: rows per micro-batch.
        num_micro_batches: micro-batches per step (gradient accumulation).
        start: consumed samples so far (global count).
        dp_rank / dp_size: data-parallel rank and size.
        collator: :class:`CollatorConfig`.
        num_samples: stop after this many global samples (default: ``len(dataset)``; ``None``
            with an unsized dataset means forever).
        drop_last: drop a final incomplete global batch.
    """

    def __init__(self, dataset, *, micro_batch_size: int, num_micro_batches: int = 1, start: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, collator: CollatorConfig = CollatorConfig(),
                 num_samples: int | None = None, drop_last: bool = True):
        if micro_batch_size < 1 or num_micro_batches < 1 or dp_size < 1:
            raise ValueError("micro_batch_size, num_micro_batches and dp_size must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
        if start < 0:
            raise ValueError(f"start (consumed samples) must be >= 0, got {start}")
        self.dataset = dataset
        self.mbs, self.nmb = micro_batch_size, num_micro_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.collator = collator
        self.start = start
        if num_samples is None and hasattr(dataset, "__len__"):
            num_samples = len(dataset)
        self.num_samples = num_samples
        self.drop_last = drop_last
        self.consumed_samples = start

    @property
    def global_batch_size(self) -> int:
        return self.mbs * self.nmb * self.dp_size

    def __iter__(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        gbs = self.global_batch_size
        base = self.start
        while True:
            end = base + gbs
            if self.num_samples is not None and end > self.num_samples:
                if self.drop_last or base >= self.num_samples:
                    return
            micro = []
            for m in range(self.nmb):
                first = base + (m * self.dp_size + self.dp_rank) * self.mbs
                idx = [i for i in range(first, first + self.mbs)
                       if self.num_samples is None or i < self.num_samples]
                if idx:
                    micro.append(collate([self.dataset.sample(i) for i in idx], self.collator))
            base = end
            self.consumed_samples = base
            if micro:
                yield micro
