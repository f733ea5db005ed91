"""Pretraining samples: coverage per epoch, determinism, resume, split and blending."""

from __future__ import annotations

import numpy as np
import pytest

from pmodel.data import (BlendedDataset, CollatorConfig, MicroBatchLoader, PretrainConfig, PretrainDataset,
                         build_pretrain_datasets, parse_data_path, split_ranges, write_indexed_dataset)


def _docs(n=37, seed=0):
    rng = np.random.default_rng(seed)
    # tokens are unique positions so coverage can be checked exactly
    lens = rng.integers(1, 40, size=n)
    out, start = [], 0
    for L in lens:
        out.append(np.arange(start, start + L))
        start += L
    return out


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_token_once_per_epoch(tmp_path, shuffle):
    docs = _docs()
    write_indexed_dataset(tmp_path / "d", docs, dtype=np.int32)
    L = 16
    ds = PretrainDataset(tmp_path / "d", PretrainConfig(seq_length=L, seed=3, shuffle=shuffle))
    total = sum(len(d) for d in docs)
    assert len(ds) == (total - 1) // L
    for epoch in range(2):
        seen = []
        doc_idx, sample_idx, shuffle_idx = ds.indices(epoch)
        # concatenate samples in stream (unshuffled) order: inputs tile the stream exactly
        stream = np.concatenate([docs[i] for i in doc_idx])
        order = np.argsort(shuffle_idx)  # position j in epoch that reads stream sample k
        for k in range(len(ds)):
            s = ds.raw_sample(epoch * len(ds) + int(order[k]))
            assert len(s) == L + 1
            np.testing.assert_array_equal(s, stream[k * L:k * L + L + 1])
            seen.append(s[:-1])
        seen = np.concatenate(seen)
        assert len(set(seen.tolist())) == len(seen) == len(ds) * L  # each token once as input
    if shuffle:
        assert not np.array_equal(ds.indices(0)[0], ds.indices(1)[0])  # epoch-aware reshuffle


def test_deterministic_cached_and_resumable(tmp_path):
    write_indexed_dataset(tmp_path / "d", _docs(), dtype=np.int32)
    cfg = PretrainConfig(seq_length=8, seed=7)
    a = PretrainDataset(tmp_path / "d", cfg)
    a.raw_sample(0)  # builds and caches epoch 0's indices next to the data
    b = PretrainDataset(tmp_path / "d", cfg)  # reads the cached indices
    assert list(tmp_path.glob("d_train_L8_s7_e0_*_shuffle.npy"))
    for i in (0, 5, len(a) + 3):
        np.testing.assert_array_equal(a.raw_sample(i), b.raw_sample(i))
    c = PretrainDataset(tmp_path / "d", PretrainConfig(seq_length=8, seed=8))
    assert any(not np.array_equal(a.raw_sample(i), c.raw_sample(i)) for i in range(len(a)))
    s = a.sample(2)
    np.testing.assert_array_equal(s["labels"][:-1], s["tokens"][1:])
    # resume: a loader started at consumed_samples yields what the full run yields from there
    full = list(MicroBatchLoader(a, micro_batch_size=2, num_micro_batches=2, collator=CollatorConfig(seq_length=8)))
    resumed = list(MicroBatchLoader(a, micro_batch_size=2, num_micro_batches=2, start=8,
                                    collator=CollatorConfig(seq_length=8)))
    assert len(resumed) == len(full) - 2
    for x, y in zip(full[2:], resumed):
        for mx, my in zip(x, y):
            assert (mx["tokens"] == my["tokens"]).all()


def test_data_parallel_ranks_partition_global_batch(tmp_path):
    write_indexed_dataset(tmp_path / "d", _docs(), dtype=np.int32)
    ds = PretrainDataset(tmp_path / "d", PretrainConfig(seq_length=8, seed=1))
    rows = []
    for r in range(2):
        it = iter(MicroBatchLoader(ds, micro_batch_size=2, num_micro_batches=2, dp_rank=r, dp_size=2))
        step = next(it)
        rows += [tuple(t.tolist()) for mb in step for t in mb["tokens"]]
    expect = [tuple(ds.sample(i)["tokens"].tolist()) for i in range(8)]
    assert sorted(rows) == sorted(expect)


def test_split_and_blend(tmp_path):
    assert split_ranges("98,1,1", 1000) == [(0, 980), (980, 990), (990, 1000)]
    assert split_ranges("1", 10) == [(0, 10), (10, 10), (10, 10)]
    assert parse_data_path(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    with pytest.raises(ValueError, match="weight prefix"):
        parse_data_path(["0.3", "a", "b"])
    write_indexed_dataset(tmp_path / "a", _docs(100, 1), dtype=np.int32)
    write_indexed_dataset(tmp_path / "b", [d + 100000 for d in _docs(100, 2)], dtype=np.int32)
    tr, va, te = build_pretrain_datasets([str(tmp_path / "a")], split="80,10,10", seq_length=8, seed=0)
    assert tr.doc_range == (0, 80) and va.doc_range == (80, 90) and te.doc_range == (90, 100)
    tr, va, te = build_pretrain_datasets(["0.3", str(tmp_path / "a"), "0.7", str(tmp_path / "b")],
                                         split="80,10,10", seq_length=8, seed=0, num_samples=[1000, 10, 10])
    assert isinstance(tr, BlendedDataset) and len(tr) == 1000
    from_b = sum(int(tr.sample(i)["tokens"][0] >= 100000) for i in range(1000))
    assert from_b == 700
    counts = np.bincount(tr.dataset_index[:10], minlength=2)
    assert abs(counts[1] - 7) <= 1  # greedy blending tracks the weights at every prefix


def test_cached_indices_are_keyed_by_the_dataset_content(tmp_path):
    """Another corpus preprocessed into the same prefix (same number of sequences and tokens,
    other lengths) gets its own indices, not the first corpus's cached ones."""
    docs = _docs(seed=0)
    write_indexed_dataset(tmp_path / "d", docs, dtype=np.int32)
    cfg = PretrainConfig(seq_length=8, seed=7)
    PretrainDataset(tmp_path / "d", cfg).raw_sample(0)  # caches epoch 0's indices
    other = [np.arange(len(x)) + 1000 for x in docs[::-1]]  # same counts, lengths in another order
    write_indexed_dataset(tmp_path / "d", other, dtype=np.int32)
    got = PretrainDataset(tmp_path / "d", cfg)
    fresh = PretrainDataset(tmp_path / "d", PretrainConfig(seq_length=8, seed=7, cache_dir=str(tmp_path / "c")))
    for k, (a, b) in enumerate(zip(got.indices(0), fresh.indices(0))):
        np.testing.assert_array_equal(a, b, err_msg=f"index {k}")
    for i in range(len(got)):
        np.testing.assert_array_equal(got.raw_sample(i), fresh.raw_sample(i))
