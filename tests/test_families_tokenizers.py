"""Family tokenizers (../shared/data/tokenizers): ChatGLM3, Baichuan, Baichuan2, InternLM, InternLM2,
Qwen and GPT-2 against their references.

References, strongest first:
* the official tokenizer classes, run here: the remote code of ChatGLM3 (``ChatGLMTokenizer``),
  Baichuan / Baichuan2 (``BaichuanTokenizer``), InternLM (``InternLMTokenizer``) and Qwen
  (``QWenTokenizer``) from ../shared/data/reference_code, and transformers' ``GPT2Tokenizer``,
  on mixed English / Chinese / code / emoji / digit / whitespace text, with and without their
  default special tokens (two transformers-5 shims below, test-side only);
* InternLM2 has no remote code here: ``sentencepiece`` itself (what its HF tokenizer wraps) and
  the chat-token names of its tokenizer_config (README);
* the id lists recorded in ../shared/data/tokenizers/README.md (some matching chatglm.cpp's
  own tokenizer tests).
"""
from __future__ import annotations

import importlib.util
import json
import sys
import unicodedata

import pytest

from pmodel.data import load_tokenizer
from tests._data_helpers import shared_data

S = ["Hello world", "Hello world, 你好", "This is a test sentence.", " Hello", "Hello  world ",
     "12345 + 678 = 13023", "I'm here!\n\nNew line\tTab", "def f(x):\n    return x**2"]

# Ids for S1..S8 and a few more strings, copied from ../shared/data/tokenizers/README.md.
KNOWN = {
    "chatglm3": [
        [13755, 993], [13755, 993, 30932, 36474, 54591], [666, 323, 260, 1429, 8446, 30930], [265, 24218],
        [13755, 265, 8515, 30910],
        [30910, 30939, 30943, 30966, 30972, 30970, 1270, 30910, 30978, 30981, 30973, 542, 30910, 30939, 30966,
         30940, 30943, 30966],
        [307, 30953, 30924, 985, 30992, 13, 13, 4872, 1699, 12, 21390],
        [884, 279, 30946, 30948, 1528, 13, 296, 3793, 1994, 932, 30943]],
    "baichuan2": [
        [23160, 2063], [23160, 2063, 92323, 100030, 92428], [2347, 1414, 1346, 2804, 15807, 72], [52594],
        [23160, 92311, 2063, 92311],
        [92336, 92338, 92354, 92369, 92358, 92311, 62, 92311, 92373, 92383, 92370, 92311, 64, 92311, 92336, 92354,
         92335, 92338, 92354],
        [92346, 92404, 92326, 2328, 73, 5, 5, 3978, 3438, 6, 40570],
        [5273, 1365, 92352, 92365, 3408, 5, 1411, 3509, 4838, 2229, 92338]],
    "baichuan": [
        [24568, 1275], [24568, 1275, 31125, 9875, 31213], [1170, 715, 650, 1801, 10583, 79], [31106, 24568],
        [24568, 31106, 1275, 31106],
        [31106, 53, 54, 55, 56, 57, 2447, 31106, 58, 59, 60, 1147, 31106, 53, 55, 52, 54, 55],
        [708, 31155, 31120, 1459, 80, 5, 5, 2815, 2201, 6, 30863],
        [1410, 668, 31146, 31141, 2942, 5, 31106, 31106, 31106, 1711, 2759, 2614, 54]],
    "internlm2": [
        [9843, 2028], [9843, 2028, 328, 262, 77230], [2136, 505, 395, 1420, 11802, 281], [22190],
        [9843, 387, 14748, 262], [4575, 1889, 619, 262, 17163, 415, 262, 5926, 1540],
        [295, 2940, 1734, 2370, 3725, 1700, 363, 8714], [882, 413, 2226, 1122, 388, 821, 991, 465, 314]],
}
MORE = {  # (text, ids, with the family's default special tokens?)
    "chatglm3": [("你好，世界", [36474, 54591, 31123, 31661], False),
                 ("你好", [64790, 64792, 36474, 54591], True)],  # chatglm.cpp's ChatGLM3 test
    "baichuan2": [("你好，世界", [16829, 65, 2089], False), ("你是谁", [92067], False)],
    "baichuan": [("你好，世界", [9875, 31213, 72, 2781], False), ("你是谁", [9875, 21797], False)],
    "internlm2": [("你好，世界", [77230, 60353, 68339], False)],
    "internlm": [("你好", [1, 76379], True)],
}
# The README's facts on each folder: family, vocab size, BOS prefix, EOS, PAD, added by default?
FACTS = {
    "chatglm3": ("chatglm3", 64798, (64790, 64792), 2, 0, True),
    "baichuan": ("baichuan", 64000, (1,), 2, 0, False),
    "baichuan2": ("baichuan2", 125696, (1,), 2, 0, False),
    "internlm": ("internlm", 103168, (1,), 2, None, True),
    "internlm2": ("internlm2", 92544, (1,), 2, None, True),
    "qwen": ("qwen", 151851, (), 151643, 151643, False),
    "gpt2": ("hf", 50257, (), 50256, None, False),
}

MIXED = [
    "Hello 世界! def f(x):\n    return x**2  # 平方 🤗👋🏽 in 2024年, naïve café\tTab",
    "混合 text: `print('你好, world')` → 输出; emoji 😀😃🎉 and numbers 3.14159 ＡＢＣ１２３",
    "  leading spaces\n\n\ttabs and   runs of   spaces  \r\nCRLF 。，！？「」",
    "class Foo:\n    def __init__(self):\n        self.x = {'键': [1, 2, 3]}  # 注释\n",
    "Ünïcödé combining: e\u0301 vs é; Ω; 한국어; русский; العربية; ﬁ ligature",
]


@pytest.fixture(scope="module")
def toks():
    root = shared_data() / "tokenizers"
    return {name: load_tokenizer(root / name) for name in FACTS}


def _long_text() -> str:
    root = shared_data()
    zh = json.loads((root / "sft" / "llamafactory" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
    en = (root / "pretrain" / "wiki_demo.txt").read_text(encoding="utf-8")
    return en[:6000] + "\n".join(r["instruction"] + "\n" + r["output"] for r in zh[:15]) + "\n" + "\n".join(MIXED)


def test_load_tokenizer_picks_the_family(toks):
    for name, (family, vocab, bos_ids, eos, pad, add_bos) in FACTS.items():
        t = toks[name]
        got = (t.family, t.vocab_size, tuple(t.bos_ids), t.eos_id, t.pad_id, t.add_bos)
        assert got == (family, vocab, bos_ids, eos, pad, add_bos), name


def test_chatglm3_special_ids(toks):
    t = toks["chatglm3"]
    want = {"[MASK]": 64789, "[gMASK]": 64790, "[sMASK]": 64791, "sop": 64792, "eop": 64793,
            "<|system|>": 64794, "<|user|>": 64795, "<|assistant|>": 64796, "<|observation|>": 64797}
    assert {k: t.special_tokens[k] for k in want} == want
    assert t.bos_id == 64792
    # special strings are never forged from text unless asked; decode writes them out
    assert 64795 not in t.encode("<|user|>")
    assert t.encode("<|user|>", allow_special=True) == [64795]
    assert t.decode([64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]) == "[gMASK]sop<|user|>\n 你好<|assistant|>"


def test_internlm2_chat_tokens(toks):
    t = toks["internlm2"]
    want = {"<|plugin|>": 92538, "<|interpreter|>": 92539, "<|action_end|>": 92540, "<|action_start|>": 92541,
            "<|im_end|>": 92542, "<|im_start|>": 92543}
    assert {k: t.special_tokens[k] for k in want} == want
    ids = [1, 92543, 1008, 364, 77230, 92542, 364, 92543, 525, 11353, 364]  # README
    text = "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert t.encode(text, bos=True, allow_special=True) == ids
    assert t.encode(text.replace("<|im_start|>", "[UNUSED_TOKEN_146]").replace("<|im_end|>", "[UNUSED_TOKEN_145]"),
                    bos=True) == ids
    assert t.decode(ids[1:]) == text


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_readme_encodings(toks, name):
    t = toks[name]
    for s, want in zip(S, KNOWN[name]):
        assert t.encode(s) == want, (name, s)
        assert t.decode(want) == s, (name, s)
    for s, want, special in MORE.get(name, []):
        assert t.encode(s, bos=special) == want, (name, s)


def test_internlm_readme_encodings(toks):
    for s, want, special in MORE["internlm"]:
        assert toks["internlm"].encode(s, bos=special) == want


def test_internlm2_equals_sentencepiece(toks):
    """No InternLM2 remote code here: its HF tokenizer is sentencepiece + BOS (add_bos_token)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(shared_data() / "tokenizers" / "internlm2" / "tokenizer.model"))
    t = toks["internlm2"]
    for text in MIXED + [_long_text()]:
        assert t.encode(text, bos=t.add_bos) == [1] + sp.encode(text)
        assert t.decode(t.encode(text)) == text


# --------------------------------------------------------------------------- official tokenizers


def _module(folder: str, stem: str):
    path = shared_data() / "reference_code" / folder / f"{stem}.py"
    if not path.exists():
        pytest.skip(f"{path} not present")
    name = f"_reftok_{folder}_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        m = importlib.util.module_from_spec(spec)
        sys.modules[name] = m
        spec.loader.exec_module(m)
    return sys.modules[name]


def official(name: str):
    """The family's official tokenizer, as shipped, with test-side shims for transformers 5."""
    pytest.importorskip("transformers")
    root = shared_data()
    tok_dir = root / "tokenizers"
    if name == "chatglm3":
        base = _module("chatglm3", "tokenization_chatglm").ChatGLMTokenizer

        class ChatGLM(base):
            def _pad(self, *a, padding_side=None, **kw):  # transformers 5 passes padding_side; 4.x did not
                return super()._pad(*a, **kw)

            def batch_encode_plus(self, batch, return_tensors=None, is_split_into_words=False):
                # removed in transformers 5; for build_chat_input's one row of ids, 4.x returned
                # build_inputs_with_special_tokens(ids) (no truncation, no padding)
                import torch
                assert is_split_into_words and return_tensors == "pt" and len(batch) == 1
                return {"input_ids": torch.tensor([self.build_inputs_with_special_tokens(list(batch[0]))])}
        return ChatGLM(vocab_file=str(tok_dir / "chatglm3" / "tokenizer.model"))
    if name in ("baichuan", "baichuan2"):
        folder = "baichuan2_13b" if name == "baichuan2" else "baichuan_13b_v1"
        base = _module(folder, "tokenization_baichuan").BaichuanTokenizer
        cfg = json.loads((root / "reference_code" / folder / "tokenizer_config.json").read_text())

        class Baichuan(base):  # transformers >= 4.34 calls get_vocab() in __init__, before sp_model exists
            def __init__(self, vocab_file, **kw):
                import sentencepiece as spm
                self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
                super().__init__(vocab_file, **kw)
        return Baichuan(str(tok_dir / name / "tokenizer.model"), add_bos_token=cfg["add_bos_token"],
                        add_eos_token=cfg["add_eos_token"])
    if name == "internlm":
        return _module("internlm", "tokenization_internlm").InternLMTokenizer(
            vocab_file=str(tok_dir / "internlm" / "V7_sft.model"))
    if name == "qwen":
        pytest.importorskip("tiktoken")
        return _module("qwen", "tokenization_qwen").QWenTokenizer(vocab_file=str(tok_dir / "qwen" / "qwen.tiktoken"))
    if name == "gpt2":
        from transformers import GPT2Tokenizer
        return GPT2Tokenizer.from_pretrained(str(tok_dir / "gpt2"))
    raise KeyError(name)


OFFICIAL = ["chatglm3", "baichuan", "baichuan2", "internlm", "qwen", "gpt2"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_equals_official_tokenizer(toks, name):
    ref = official(name)
    t = toks[name]
    texts = S + MIXED + [_long_text()]
    for text in texts:
        plain = ref.encode(text, add_special_tokens=False)
        assert t.encode(text) == plain, (name, text[:60])
        # the reference's default call adds the family's special tokens (or none)
        assert t.encode(text, bos=t.add_bos) == ref(text)["input_ids"], (name, text[:60])
        # decode round-trips, up to the normalisation the family applies before encoding:
        # Qwen NFC, Baichuan (v1) SentencePiece's nmt_nfkc (then compared with the reference's decode)
        want_text = unicodedata.normalize("NFC", text) if name == "qwen" else text
        if name == "baichuan":
            want_text = ref.decode(plain)
        assert t.decode(plain) == want_text, (name, text[:60])
    assert t.vocab_size == (len(ref) if name == "qwen" else ref.vocab_size)


def test_official_special_ids():
    ref = official("chatglm3")
    tok = load_tokenizer(shared_data() / "tokenizers" / "chatglm3")
    for s in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
              "<|observation|>"):
        assert tok.special_tokens[s] == ref.get_command(s), s
    assert tok.eos_id == ref.eos_token_id and tok.pad_id == ref.pad_token_id
    q = official("qwen")
    qt = load_tokenizer(shared_data() / "tokenizers" / "qwen")
    assert {s: qt.special_tokens[s] for s in q.special_tokens} == dict(q.special_tokens)
    assert (qt.eos_id, qt.special_tokens["<|im_start|>"], qt.special_tokens["<|im_end|>"]) == (
        q.eod_id, q.im_start_id, q.im_end_id)
    text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    assert qt.encode(text, allow_special=True) == q.encode(text)  # Qwen's default: allowed_special="all"
