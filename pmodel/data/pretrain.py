"""Pretraining samples from indexed datasets (Megatron GPTDataset semantics, epoch-aware).

A :class:`PretrainDataset` takes the documents of one split of an ``MMIDIDX`` dataset and,
for each epoch ``e``:

1. shuffles the document order with a generator seeded by ``(seed, e)``
   (the *document index*);
2. concatenates the documents and cuts the stream into samples of ``seq_length + 1`` tokens
   that overlap by one token (sample ``j`` covers stream tokens ``[j*L, j*L + L + 1)``, with
   ``L = seq_length``), so every token of the epoch's stream is an input exactly once
   (the last ``< L`` tokens of an epoch are dropped) -- the *sample index*;
3. shuffles the samples with a generator seeded by ``(seed, e)`` (the *shuffle index*).

Global sample ``i`` is sample ``shuffle[i % n]`` of epoch ``i // n``, so any position can be
read directly: resuming training from ``consumed_samples`` needs nothing else. Indices are
cached next to the data as ``.npy`` files (``allow_pickle=False``) keyed by a hash of
everything they depend on: the dataset files' fingerprint (size and mtime of ``.bin`` / ``.idx``,
sha256 of the ``.idx``), the document range, ``seq_length``, seed, shuffle and epoch.

:class:`BlendedDataset` mixes datasets with weights using Megatron's deterministic greedy
rule: sample ``i`` comes from the dataset whose realised share lags its weight the most.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .indexed import IndexedDataset

__all__ = ["split_ranges", "parse_data_path", "PretrainConfig", "PretrainDataset",
           "BlendedDataset", "build_pretrain_datasets"]


def split_ranges(split: str | Sequence[float], num_documents: int) -> list[tuple[int, int]]:
    """Document ranges for a Megatron ``--split`` like ``"98,1,1"`` (same rounding as Megatron).

    Args:
        split: comma/slash separated weights or a sequence of weights (1 to 3 entries;
            missing entries are 0).
        num_documents: documents in the dataset.

    Returns:
        ``[(start, end)] * 3`` for train, valid and test.
    """
    if isinstance(split, str):
        parts = [p for p in split.replace("/", ",").split(",") if p.strip()]
        try:
            weights = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"split {split!r}: expected numbers like '98,1,1'") from None
    else:
        weights = [float(w) for w in split]
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"split {split!r}: expected 1-3 non-negative weights with a positive sum")
    weights = weights + [0.0] * (3 - len(weights))
    total = sum(weights)
    weights = [w / total for w in weights]
    index = [0]
    for w in weights:
        index.append(index[-1] + int(round(w * float(num_documents))))
    diff = index[-1] - num_documents
    for i in range(1, len(index)):
        index[i] -= diff
    return [(index[i], index[i + 1]) for i in range(3)]


def parse_data_path(data_path: Sequence[str] | str) -> list[tuple[float, str]]:
    """Parse Megatron's ``--data-path``: ``a`` or ``0.3 a 0.7 b``.

    Args:
        data_path: list of tokens (or one whitespace-separated string).

    Returns:
        ``[(weight, prefix)]`` with weights normalised to sum 1.
    """
    items = data_path.split() if isinstance(data_path, str) else list(data_path)
    if not items:
        raise ValueError("data_path is empty")
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2:
        raise ValueError(f"data_path {items}: expected 'weight prefix' pairs or a single prefix")
    out = []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            wf = float(w)
        except ValueError:
            raise ValueError(f"data_path: {w!r} is not a weight (expected 'weight prefix' pairs)") from None
        if wf < 0:
            raise ValueError(f"data_path: negative weight {wf} for {p}")
        out.append((wf, p))
    total = sum(w for w, _ in out)
    if total <= 0:
        raise ValueError("data_path: weights sum to 0")
    return [(w / total, p) for w, p in out]


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """How samples are cut from a dataset.

    Args:
        seq_length: tokens per training sample (each sample holds ``seq_length + 1``).
        seed: shuffling seed.
        shuffle: shuffle documents and samples (False keeps file order; for tests/eval).
        cache_dir: where to cache indices (default: next to the data).
    """

    seq_length: int
    seed: int = 1234
    shuffle: bool = True
    cache_dir: str | None = None

    def __post_init__(self):
        if self.seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {self.seq_length}")


def _rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, salt])


class PretrainDataset:
    """Fixed-length samples over documents ``[doc_start, doc_end)`` of an indexed dataset.

    ``ds[i]`` / ``ds.sample(i)`` works for any ``i >= 0`` (epochs repeat with new shuffles);
    ``len(ds)`` is the number of samples in one epoch.

    Args:
        prefix: the ``MMIDIDX`` prefix, or an open :class:`IndexedDataset`.
        config: :class:`PretrainConfig`.
        doc_range: ``(start, end)`` documents (default: all).
        name: label for errors and cache file names (e.g. ``"train"``).
    """

    def __init__(self, prefix: str | Path | IndexedDataset, config: PretrainConfig,
                 doc_range: tuple[int, int] | None = None, name: str = "train"):
        self.data = prefix if isinstance(prefix, IndexedDataset) else IndexedDataset(prefix)
        self.config = config
        self.name = name
        n_docs = self.data.num_documents
        start, end = doc_range if doc_range is not None else (0, n_docs)
        if not 0 <= start <= end <= n_docs:
            raise ValueError(f"{self.data.prefix}: document range [{start}, {end}) outside [0, {n_docs})")
        self.doc_range = (start, end)
        doc_idx = self.data.document_indices
        # A document may hold several sequences; pretraining reads sequence by sequence.
        self._seq_start = int(doc_idx[start]) if n_docs else 0
        self._seq_end = int(doc_idx[end]) if n_docs else 0
        lengths = self.data.sequence_lengths[self._seq_start:self._seq_end].astype(np.int64)  # (S,)
        self._lengths = lengths
        self.tokens_per_epoch = int(lengths.sum())
        L = config.seq_length
        self.samples_per_epoch = max((self.tokens_per_epoch - 1) // L, 0)
        if self.samples_per_epoch == 0:
            raise ValueError(
                f"{self.data.prefix} [{name}]: {self.tokens_per_epoch} tokens in documents "
                f"[{start}, {end}) cannot fill one sample of seq_length {L} + 1")
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.samples_per_epoch

    # -- indices -------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        """What identifies the dataset files: size and mtime of ``.bin`` / ``.idx`` and the sha256
        of the ``.idx`` (sequence lengths and documents), computed once per open dataset."""
        fp = getattr(self.data, "_pmodel_fingerprint", None)
        if fp is None:
            fp = {}
            for ext in (".bin", ".idx"):
                st = os.stat(self.data.prefix + ext)
                fp[ext] = [st.st_size, st.st_mtime_ns]
            h = hashlib.sha256()
            with open(self.data.prefix + ".idx", "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            fp["idx_sha256"] = h.hexdigest()
            try:
                self.data._pmodel_fingerprint = fp
            except AttributeError:
                pass
        return fp

    def _cache_paths(self, epoch: int) -> Path:
        # Keyed by the files' content and every parameter that shapes the indices: another corpus
        # preprocessed into the same prefix, or other shaping parameters, get their own indices.
        key = json.dumps({
            "prefix": os.path.abspath(self.data.prefix), "seqs": [self._seq_start, self._seq_end],
            "docs": list(self.doc_range), "files": self._fingerprint(),
            "tokens": self.tokens_per_epoch, "seq_length": self.config.seq_length,
            "seed": self.config.seed, "shuffle": self.config.shuffle, "epoch": epoch, "v": 2,
        }, sort_keys=True)
        h = hashlib.sha1(key.encode()).hexdigest()[:16]
        base = Path(self.config.cache_dir) if self.config.cache_dir else Path(self.data.prefix).parent
        stem = Path(self.data.prefix).name
        return base / f"{stem}_{self.name}_L{self.config.seq_length}_s{self.config.seed}_e{epoch}_{h}"

    def indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document index, sample index, shuffle index) of one epoch.

        The document index lists sequence ids (relative to the split) in stream order. The
        sample index has ``samples_per_epoch + 1`` rows ``(position in document index,
        offset in that sequence)`` marking where each sample starts. The shuffle index is the
        sample order.

        Args:
            epoch: the epoch (0-based).

        Returns:
            ``(doc_idx (S,) int64, sample_idx (N+1, 2) int64, shuffle_idx (N,) int64)``.
        """
        if epoch in self._epochs:
            return self._epochs[epoch]
        base = self._cache_paths(epoch)
        names = [base.with_name(base.name + f"_{k}.npy") for k in ("doc", "sample", "shuffle")]
        if all(p.exists() for p in names):
            arrays = tuple(np.load(p, allow_pickle=False, mmap_mode="r") for p in names)
        else:
            arrays = self._build(epoch)
            try:
                base.parent.mkdir(parents=True, exist_ok=True)
                for p, a in zip(names, arrays):
                    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
                    with open(tmp, "wb") as f:
                        np.save(f, a, allow_pickle=False)
                    os.replace(tmp, p)
            except OSError:
                pass  # read-only data folder: indices are cheap to rebuild
        if len(self._epochs) >= 4:  # keep a few epochs in memory, not all
            self._epochs.pop(next(iter(self._epochs)))
        self._epochs[epoch] = arrays  # type: ignore[assignment]
        return arrays  # type: ignore[return-value]

    def _build(self, epoch: int):
        n_seq = len(self._lengths)
        doc_idx = np.arange(n_seq, dtype=np.int64)  # (S,)
        if self.config.shuffle:
            _rng(self.config.seed, epoch, 0).shuffle(doc_idx)
        L, N = self.config.seq_length, self.samples_per_epoch
        lens = self._lengths[doc_idx]  # (S,) lengths in stream order
        ends = np.cumsum(lens)  # (S,) stream end of each sequence
        starts_tok = np.arange(N + 1, dtype=np.int64) * L  # (N+1,) stream start of each sample
        pos = np.searchsorted(ends, starts_tok, side="right")  # sequence holding the token
        offset = starts_tok - (ends[pos] - lens[pos])
        sample_idx = np.stack([pos, offset], axis=1).astype(np.int64)  # (N+1, 2)
        shuffle_idx = np.arange(N, dtype=np.int64)  # (N,)
        if self.config.shuffle:
            _rng(self.config.seed, epoch, 1).shuffle(shuffle_idx)
        return doc_idx, sample_idx, shuffle_idx

    # -- samples -------------------------------------------------------------------------
    def raw_sample(self, i: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of global sample ``i`` (int64)."""
        if i < 0:
            raise IndexError(f"sample index {i} < 0")
        epoch, j = divmod(int(i), self.samples_per_epoch)
        doc_idx, sample_idx, shuffle_idx = self.indices(epoch)
        k = int(shuffle_idx[j])
        (p0, o0), (p1, o1) = sample_idx[k], sample_idx[k + 1]
        p0, o0, p1, o1 = int(p0), int(o0), int(p1), int(o1)
        base = self._seq_start
        if p0 == p1:
            out = self.data.get(base + int(doc_idx[p0]), o0, o1 - o0 + 1)
        else:
            parts = [self.data.get(base + int(doc_idx[p0]), o0)]
            for p in range(p0 + 1, p1):
                parts.append(self.data.get(base + int(doc_idx[p])))
            parts.append(self.data.get(base + int(doc_idx[p1]), 0, o1 + 1))
            out = np.concatenate(parts)
        return out.astype(np.int64)  # (L+1,)

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Global sample ``i`` in the batch convention (labels already shifted).

        Returns:
            ``tokens`` (L,), ``labels`` (L,), ``loss_mask`` (L,) float32, ``position_ids`` (L,).
        """
        s = self.raw_sample(i)  # (L+1,)
        L = self.config.seq_length
        return {"tokens": s[:-1], "labels": s[1:], "loss_mask": np.ones(L, np.float32),
                "position_ids": np.arange(L, dtype=np.int64)}

    __getitem__ = sample


class BlendedDataset:
    """Weighted mixture of datasets (Megatron's greedy, deterministic blending).

    Sample ``i`` is taken from dataset ``argmax_k(w_k * (i + 1) - n_k)`` where ``n_k`` counts
    earlier picks of ``k``; within a dataset, samples are consumed in order 0, 1, 2, ...
    (each component reshuffles itself per epoch).

    Args:
        datasets: components exposing ``sample(i)``.
        weights: non-negative weights (normalised here).
        size: number of blended samples to index (e.g. train_iters * global_batch_size).
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"blend weights {list(weights)} must be non-negative with a positive sum")
        self.weights = w / w.sum()
        self.datasets = list(datasets)
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = self._build(self.weights, self.size)

    @staticmethod
    def _build(w: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
        # Plain Python floats: a sequential rule, and ~10x faster than numpy per step.
        weights = [float(x) for x in w]
        K = len(weights)
        counts = [0] * K
        ds_index = np.zeros(size, dtype=np.int16)  # (size,)
        ds_sample = np.zeros(size, dtype=np.int64)  # (size,)
        for i in range(size):
            best_k, best_err = 0, weights[0] * (i + 1) - counts[0]
            for k in range(1, K):
                err = weights[k] * (i + 1) - counts[k]
                if err > best_err:
                    best_k, best_err = k, err
            ds_index[i] = best_k
            ds_sample[i] = counts[best_k]
            counts[best_k] += 1
        return ds_index, ds_sample

    def __len__(self) -> int:
        return self.size

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Blended sample ``i`` (``0 <= i < size``)."""
        if not 0 <= i < self.size:
            raise IndexError(f"blended sample {i} outside [0, {self.size}); build with a larger size")
        return self.datasets[int(self.dataset_index[i])].sample(int(self.dataset_sample_index[i]))

    __getitem__ = sample


def build_pretrain_datasets(data_path: Sequence[str] | str, *, split: str = "969,30,1",
                            seq_length: int, seed: int = 1234,
                            num_samples: Sequence[int] | None = None,
                            cache_dir: str | None = None):
    """Train / valid / test datasets from Megatron-style ``--data-path`` and ``--split``.

    Args:
        data_path: ``["prefix"]`` or ``["0.3", "a", "0.7", "b"]`` (prefixes of ``.bin/.idx``).
        split: e.g. ``"98,1,1"``; applied to every component's documents.
        seq_length: tokens per sample.
        seed: shuffling seed.
        num_samples: samples needed per split (required to size a blend; ignored for one
            prefix, whose datasets serve any index).
        cache_dir: where index caches go (default: next to each dataset).

    Returns:
        ``(train, valid, test)``; an entry is ``None`` when its split is empty.
    """
    blend = parse_data_path(data_path)
    cfg = PretrainConfig(seq_length=seq_length, seed=seed, cache_dir=cache_dir)
    names = ("train", "valid", "test")
    per_split: list[list[tuple[float, PretrainDataset]]] = [[], [], []]
    for weight, prefix in blend:
        data = IndexedDataset(prefix)
        for k, rng in enumerate(split_ranges(split, data.num_documents)):
            if rng[1] > rng[0]:
                per_split[k].append((weight, PretrainDataset(data, cfg, rng, name=names[k])))
    out = []
    for k in range(3):
        comps = per_split[k]
        if not comps:
            out.append(None)
        elif len(comps) == 1 and len(blend) == 1:
            out.append(comps[0][1])
        else:
            if num_samples is None:
                raise ValueError("a blended data_path needs num_samples (per split) to size the blend")
            out.append(BlendedDataset([d for _, d in comps], [w for w, _ in comps], int(num_samples[k])))
    return tuple(out)
