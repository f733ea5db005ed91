"""Shared helpers for the data tests (not a conftest: the lead owns tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data() -> Path:
    """The ../shared/data folder, or skip the test when it is absent (fresh clone)."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data not present (fresh clone)")
    return SHARED


def train_tiny_sentencepiece(tmp_path: Path, *, user_defined=(), control=(), vocab_size=300) -> Path:
    """Train a small SentencePiece BPE model on synthetic text in ``tmp_path``."""
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    words = ["hello", "world", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
             "instruction", "response", "answer", "question", "system", "user", "assistant"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(400)]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = tmp_path / "tiny"
    spm.SentencePieceTrainer.Train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        user_defined_symbols=list(user_defined), control_symbols=list(control),
        minloglevel=2, num_threads=1)
    return prefix.with_suffix(".model")
