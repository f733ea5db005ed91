"""Bounded cost on hostile input: a 1 MB "word" (no whitespace, no digits: one pre-tokenisation
piece) encodes and round-trips on every family tokenizer within a generous wall-clock bound.
Quadratic BPE (the deleted pure-Python merger took 34 s for 40k characters) would take hours here;
the libraries pmodel now uses are linear (about 0.5 s per MB on the development VM)."""
from __future__ import annotations

import random

import pytest

from _data_helpers import SHARED

NAMES = ["llama2", "llama3", "qwen", "gpt2", "chatglm3", "baichuan2", "internlm2"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", NAMES)
def test_one_megabyte_word_round_trips(name):
    import pmodel
    folder = SHARED / "tokenizers" / name
    if not folder.exists():
        pytest.skip(f"{folder} not present (fresh clone)")
    r = random.Random(0)
    word = "".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000))
    tok = pmodel.data.load_tokenizer(folder)
    ids = tok.encode(word)
    assert 0 < len(ids) < len(word) and tok.decode(ids) == word


@pytest.mark.timeout(120)
def test_one_megabyte_word_on_the_byte_tokenizer():
    import pmodel
    word = "x" * 1_000_000
    tok = pmodel.data.load_tokenizer(None, kind="bytes")
    assert tok.decode(tok.encode(word)) == word
