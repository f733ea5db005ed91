"""Megatron ``MMIDIDX`` indexed datasets (``prefix.bin`` + ``prefix.idx``), byte-compatible
with Megatron-LM / megatron-core and ModelLink.

Layout of ``prefix.idx`` (all integers little-endian)::

    offset  size        field
    0       9           magic            b"MMIDIDX\\x00\\x00"
    9       8           version          uint64 = 1
    17      1           dtype code       uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                                6 float64, 7 float32, 8 uint16
    18      8           sequence count   uint64 = S
    26      8           document count   uint64 = D + 1 (length of the document index)
    34      4*S         sequence lengths int32, tokens per sequence
    34+4S   8*S         sequence pointers int64, byte offset of each sequence in .bin
    34+12S  8*(D+1)     document index   int64: 0, then the number of sequences seen at the
                                         end of each document (document d = sequences
                                         [doc[d], doc[d+1]))

``prefix.bin`` is the sequences' tokens back to back in the dtype above, with no header.
(megatron-core's multimodal variant appends an int8 mode per sequence; we neither write nor
need it.) A pretraining document is usually one sequence; a packed instruction sample is one
document made of several sequences, one per packed sample.

Megatron picks ``uint16`` when the vocabulary has fewer than 65500 ids, else ``int32``
(:func:`optimal_dtype`); label files that hold -100 use ``int32``.

Reading maps both files with ``numpy.memmap``; sequences are returned as views (no copy).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Sequence

import numpy as np

__all__ = ["MAGIC", "VERSION", "DTYPE_CODES", "optimal_dtype", "IndexedDatasetWriter",
           "IndexedDataset", "write_indexed_dataset"]

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES = MappingProxyType({
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
    6: np.float64, 7: np.float32, 8: np.uint16,
})
_CODE_OF = MappingProxyType({np.dtype(v): k for k, v in DTYPE_CODES.items()})


def optimal_dtype(vocab_size: int | None) -> type:
    """Megatron's choice of token dtype: uint16 below 65500 ids, else int32.

    Args:
        vocab_size: number of ids (``None`` -> int32, e.g. for labels holding -100).

    Returns:
        A numpy dtype class.
    """
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Streams sequences into ``prefix.bin``; ``finalize()`` writes ``prefix.idx``.

    Use as a context manager, or call ``finalize()`` yourself. Files are written to
    temporary names and renamed on finalize, so a crash never leaves a valid-looking pair.

    Args:
        prefix: output path prefix (``prefix.bin`` / ``prefix.idx``).
        dtype: token dtype (see :func:`optimal_dtype`).
    """

    def __init__(self, prefix: str | Path, dtype=np.int32):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code; expected one of "
                             f"{sorted(str(np.dtype(d)) for d in DTYPE_CODES.values())}")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self.prefix + ".bin.tmp"
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self._doc_index: list[int] = [0]
        self._closed = False

    def add_sequence(self, tokens: Sequence[int] | np.ndarray) -> None:
        """Append one sequence to the current document (close it with ``end_document``)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"{self.prefix}: a sequence must be 1-D, got shape {arr.shape}")
        if arr.size and arr.dtype.kind in "iu":
            info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
            if info is not None and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"{self.prefix}: values [{arr.min()}, {arr.max()}] do not fit {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._lengths.append(int(arr.size))

    def end_document(self) -> None:
        """Close the current document (the sequences added since the last call)."""
        self._doc_index.append(len(self._lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Sequence[int] | None = None) -> None:
        """Append a whole document: one sequence, or several when ``lengths`` splits it."""
        arr = np.asarray(tokens)
        if lengths is None:
            self.add_sequence(arr)
        else:
            if sum(lengths) != arr.size:
                raise ValueError(f"{self.prefix}: lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
            start = 0
            for n in lengths:
                self.add_sequence(arr[start:start + n])
                start += n
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, sequences_per_document: np.ndarray) -> None:
        """Append many documents at once (the bytes equal adding them one by one).

        Args:
            tokens: all their tokens back to back (1-D).
            lengths: tokens per sequence (sums to ``tokens.size``).
            sequences_per_document: sequences in each document (sums to ``lengths.size``).
        """
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        per_doc = np.asarray(sequences_per_document, dtype=np.int64)
        if int(lengths.sum()) != tokens.size or int(per_doc.sum()) != lengths.size:
            raise ValueError(f"{self.prefix}: {tokens.size} tokens, lengths summing to {int(lengths.sum())} over "
                             f"{lengths.size} sequences, documents holding {int(per_doc.sum())} sequences")
        if tokens.size and tokens.dtype.kind in "iu" and self.dtype.kind in "iu":
            info = np.iinfo(self.dtype)
            lo, hi = tokens.min(), tokens.max()
            if lo < info.min or hi > info.max:
                raise ValueError(f"{self.prefix}: values [{lo}, {hi}] do not fit {self.dtype}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        base = len(self._lengths)
        self._lengths.extend(lengths.tolist())
        self._doc_index.extend((base + np.cumsum(per_doc)).tolist())

    def add_index(self, prefix: str | Path) -> None:
        """Append a whole dataset (megatron-core ``IndexedDatasetBuilder.add_index``): its
        ``.bin`` bytes are copied and its sequences and documents follow the ones written so far.

        Args:
            prefix: the dataset to append (same dtype).
        """
        import shutil

        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{self.prefix}: cannot append {prefix} of dtype {other.dtype} to dtype {self.dtype}")
        base = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._doc_index.extend((base + other.document_indices[1:]).tolist())
        with open(other.prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    def finalize(self) -> None:
        """Write the index and move both files into place."""
        if self._closed:
            return
        self._closed = True
        self._bin.close()
        idx_tmp = self.prefix + ".idx.tmp"
        with open(idx_tmp, "wb") as f:
            f.write(index_bytes(self._lengths, self._doc_index, self.dtype))
        os.replace(self._bin_tmp, self.prefix + ".bin")
        os.replace(idx_tmp, self.prefix + ".idx")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finalize()
        else:
            self._bin.close()
            self._closed = True
            for p in (self._bin_tmp,):
                if os.path.exists(p):
                    os.remove(p)


def index_bytes(lengths: Sequence[int], doc_index: Sequence[int], dtype) -> bytes:
    """The exact bytes of an ``.idx`` file (see the module docstring).

    Args:
        lengths: tokens per sequence.
        doc_index: document index, starting with 0 and ending with ``len(lengths)``.
        dtype: token dtype of the ``.bin``.

    Returns:
        The file contents.
    """
    dtype = np.dtype(dtype)
    lengths_a = np.asarray(lengths, dtype=np.int32)  # (S,)
    pointers = np.zeros(len(lengths_a), dtype=np.int64)  # (S,)
    if len(lengths_a) > 1:
        np.cumsum(lengths_a[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    doc = np.asarray(doc_index, dtype=np.int64)  # (D+1,)
    return b"".join([
        MAGIC, struct.pack("<Q", VERSION), struct.pack("<B", _CODE_OF[dtype]),
        struct.pack("<Q", len(lengths_a)), struct.pack("<Q", len(doc)),
        lengths_a.tobytes(), pointers.tobytes(), doc.tobytes(),
    ])


def write_indexed_dataset(prefix: str | Path, documents: Iterable[Sequence[int]], dtype=np.int32) -> None:
    """Write documents (one sequence each) as ``prefix.bin/.idx``.

    Args:
        prefix: output prefix.
        documents: token sequences.
        dtype: token dtype.
    """
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in documents:
            w.add_document(d)


class IndexedDataset:
    """Read-only, memory-mapped ``MMIDIDX`` dataset.

    ``ds[i]`` is sequence ``i`` as a numpy view into the mapped ``.bin``; ``ds.get(i, offset,
    length)`` a slice of it. ``ds.document(d)`` returns the sequences of document ``d``.

    Args:
        prefix: path prefix (with or without a trailing ``.bin`` / ``.idx``).
    """

    def __init__(self, prefix: str | Path):
        prefix = str(prefix)
        if prefix.endswith((".bin", ".idx")):
            prefix = prefix[:-4]
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.exists(p):
                raise FileNotFoundError(f"indexed dataset file {p} does not exist")
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        if len(idx) < 34 or bytes(idx[:9]) != MAGIC:
            raise ValueError(f"{idx_path}: not an MMIDIDX index (bad magic {bytes(idx[:9])!r})")
        (version,) = struct.unpack("<Q", bytes(idx[9:17]))
        if version != VERSION:
            raise ValueError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        code = int(idx[17])
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        s, d = struct.unpack("<QQ", bytes(idx[18:34]))
        need = 34 + 12 * s + 8 * d
        if len(idx) < need:
            raise ValueError(f"{idx_path}: truncated index ({len(idx)} bytes, expected >= {need})")
        off = 34
        self.sequence_lengths = np.frombuffer(idx, dtype=np.int32, count=s, offset=off)  # (S,)
        off += 4 * s
        self.sequence_pointers = np.frombuffer(idx, dtype=np.int64, count=s, offset=off)  # (S,)
        off += 8 * s
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=d, offset=off)  # (D+1,)
        self._idx = idx
        size = os.path.getsize(bin_path)
        self._bin = np.memmap(bin_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if s else 0
        if end > size:
            raise ValueError(f"{bin_path}: {size} bytes but the index needs {end}")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``i`` (a view, no copy).

        Args:
            i: sequence index.
            offset: first token.
            length: number of tokens (default: to the end).

        Returns:
            A read-only 1-D numpy array.
        """
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"{self.prefix}: slice [{offset}, {offset + length}) out of sequence {i} of length {n}")
        ptr = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=ptr)

    def __getitem__(self, i: int) -> np.ndarray:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.prefix}: sequence {i} out of range [0, {len(self)})")
        return self.get(i)

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences of document ``d``."""
        a, b = int(self.document_indices[d]), int(self.document_indices[d + 1])
        return [self.get(i) for i in range(a, b)]
