"""Megatron MMIDIDX .bin/.idx: golden bytes, round trip, megatron-core compatibility."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from pmodel.data import IndexedDataset, IndexedDatasetWriter, optimal_dtype, write_indexed_dataset

# Hand-built from the documented layout: 3 documents [5, 6, 7], [8], [9, 10] as uint16.
GOLDEN_IDX = (
    b"MMIDIDX\x00\x00"                        # magic
    + b"\x01\x00\x00\x00\x00\x00\x00\x00"    # version 1 (uint64 LE)
    + b"\x08"                                 # dtype code 8 = uint16
    + b"\x03\x00\x00\x00\x00\x00\x00\x00"    # 3 sequences
    + b"\x04\x00\x00\x00\x00\x00\x00\x00"    # document index has 4 entries
    + b"\x03\x00\x00\x00" + b"\x01\x00\x00\x00" + b"\x02\x00\x00\x00"      # lengths int32
    + b"\x00" * 8 + b"\x06" + b"\x00" * 7 + b"\x08" + b"\x00" * 7            # pointers int64 (bytes)
    + b"\x00" * 8 + b"\x01" + b"\x00" * 7 + b"\x02" + b"\x00" * 7 + b"\x03" + b"\x00" * 7  # doc index
)
GOLDEN_BIN = b"\x05\x00\x06\x00\x07\x00\x08\x00\x09\x00\x0a\x00"


def test_golden_bytes(tmp_path):
    write_indexed_dataset(tmp_path / "g", [[5, 6, 7], [8], [9, 10]], dtype=np.uint16)
    assert (tmp_path / "g.idx").read_bytes() == GOLDEN_IDX
    assert (tmp_path / "g.bin").read_bytes() == GOLDEN_BIN
    ds = IndexedDataset(tmp_path / "g")
    assert len(ds) == 3 and ds.num_documents == 3 and ds.dtype == np.uint16
    assert [list(ds[i]) for i in range(3)] == [[5, 6, 7], [8], [9, 10]]
    assert list(ds.get(0, 1, 2)) == [6, 7]


def test_round_trip_multi_sequence_documents(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100000, size=rng.integers(0, 50)) for _ in range(40)]
    with IndexedDatasetWriter(tmp_path / "r", np.int32) as w:
        for d in docs[:20]:
            w.add_document(d)
        # a packed document: several sequences
        w.add_document(np.concatenate(docs[20:]), lengths=[len(d) for d in docs[20:]])
    ds = IndexedDataset(str(tmp_path / "r") + ".bin")
    assert ds.num_documents == 21 and len(ds) == 40
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    assert [len(s) for s in ds.document(20)] == [len(d) for d in docs[20:]]
    # views into the mmap, no copy
    assert not ds[0].flags.owndata and not ds[0].flags.writeable


def test_header_fields_and_errors(tmp_path):
    write_indexed_dataset(tmp_path / "h", [[1, 2]], dtype=np.int32)
    raw = (tmp_path / "h.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<Q", raw[9:17]) == (1,) and raw[17] == 4
    (tmp_path / "bad.idx").write_bytes(b"NOTMAGIC!" + raw[9:])
    (tmp_path / "bad.bin").write_bytes((tmp_path / "h.bin").read_bytes())
    with pytest.raises(ValueError, match="bad.idx: not an MMIDIDX"):
        IndexedDataset(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="missing.idx"):
        IndexedDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="do not fit"):
        write_indexed_dataset(tmp_path / "o", [[70000]], dtype=np.uint16)
    assert optimal_dtype(32000) is np.uint16 and optimal_dtype(128256) is np.int32 and optimal_dtype(None) is np.int32


def test_megatron_core_compatibility(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [[5, 6, 7], [8], [9, 10, 11, 12]]
    # theirs -> bytes equal ours
    b = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for d in docs:
        b.add_item(torch.tensor(d))
        b.end_document()
    b.finalize(str(tmp_path / "m.idx"))
    write_indexed_dataset(tmp_path / "o", docs, dtype=np.uint16)
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "o.idx").read_bytes()
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "o.bin").read_bytes()
    # ours -> readable by theirs (multi-sequence document included)
    with IndexedDatasetWriter(tmp_path / "p", np.int32) as w:
        w.add_document([1, 2, 3, 4, 5], lengths=[2, 3])
        w.add_document([6])
    m = MIndexed(str(tmp_path / "p"))
    assert len(m) == 3 and list(m.document_indices) == [0, 2, 3]
    assert [list(m[i]) for i in range(3)] == [[1, 2], [3, 4, 5], [6]]
