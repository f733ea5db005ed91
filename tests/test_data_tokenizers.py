"""Tokenizers: known encodings from ../shared/data/tokenizers/README.md, round trips, vocab checks."""

from __future__ import annotations

import pytest

from pmodel.data import ByteTokenizer, check_vocab_size, load_tokenizer
from tests._data_helpers import shared_data, train_tiny_sentencepiece

S = ["Hello world", "Hello world, 你好", "This is a test sentence.", " Hello", "Hello  world ",
     "12345 + 678 = 13023", "I'm here!\n\nNew line\tTab", "def f(x):\n    return x**2"]

# Known-good ids for S1..S8, copied from ../shared/data/tokenizers/README.md.
KNOWN = {
    "llama2/tokenizer.model": [
        [15043, 3186], [15043, 3186, 29892, 29871, 30919, 31076], [910, 338, 263, 1243, 10541, 29889],
        [29871, 15043], [15043, 29871, 3186, 29871],
        [29871, 29896, 29906, 29941, 29946, 29945, 718, 29871, 29953, 29955, 29947, 353, 29871, 29896, 29941, 29900, 29906, 29941],
        [306, 29915, 29885, 1244, 29991, 13, 13, 4373, 1196, 12, 8863],
        [822, 285, 29898, 29916, 1125, 13, 1678, 736, 921, 1068, 29906]],
    "llama3/tokenizer.model": [
        [9906, 1917], [9906, 1917, 11, 118195, 53901], [2028, 374, 264, 1296, 11914, 13], [22691],
        [9906, 220, 1917, 220], [4513, 1774, 489, 220, 17458, 284, 220, 5894, 1419],
        [40, 2846, 1618, 2268, 3648, 1584, 197, 8750], [755, 282, 2120, 997, 262, 471, 865, 334, 17]],
    "mistral/tokenizer.model.v1": [
        [22557, 1526], [22557, 1526, 28725, 28705, 29383, 29530], [851, 349, 264, 1369, 12271, 28723],
        [28705, 22557], [22557, 28705, 1526, 28705],
        [28705, 28740, 28750, 28770, 28781, 28782, 648, 28705, 28784, 28787, 28783, 327, 28705, 28740, 28770, 28734, 28750, 28770],
        [315, 28742, 28719, 1236, 28808, 13, 13, 2972, 1407, 12, 7560],
        [801, 285, 28732, 28744, 1329, 13, 2287, 604, 1318, 348, 28750]],
    "mistral/mistral_instruct_tokenizer_240323.model.v3": [
        [23325, 2294], [23325, 2294, 29493, 29473, 30151, 30298], [1619, 1117, 1032, 2137, 13039, 29491],
        [29473, 23325], [23325, 29473, 2294, 29473],
        [29473, 29508, 29518, 29538, 29549, 29550, 1416, 29473, 29552, 29555, 29551, 1095, 29473, 29508, 29538, 29502, 29518, 29538],
        [1083, 29510, 29487, 2004, 29576, 781, 781, 3740, 2175, 780, 8328],
        [1569, 1053, 29500, 29512, 2097, 781, 3055, 1372, 2086, 1116, 29518]],
    "qwen/qwen.tiktoken": [
        [9707, 1879], [9707, 1879, 11, 220, 108386], [1986, 374, 264, 1273, 11652, 13], [21927],
        [9707, 220, 1879, 220], [16, 17, 18, 19, 20, 488, 220, 21, 22, 23, 284, 220, 16, 18, 15, 17, 18],
        [40, 2776, 1588, 2219, 3564, 1555, 197, 8582], [750, 282, 2075, 982, 262, 470, 856, 334, 17]],
    "internlm/V7_sft.model": [
        [9843, 2028], [9843, 2028, 328, 262, 76379], [2136, 505, 395, 1420, 11802, 281], [22190],
        [9843, 387, 14748, 262], [4575, 1889, 619, 262, 17163, 415, 262, 5926, 1540],
        [295, 2940, 1734, 2370, 3725, 1700, 363, 8714], [882, 413, 2226, 1122, 388, 821, 991, 465, 314]],
    "gpt2": [
        [15496, 995], [15496, 995, 11, 220, 19526, 254, 25001, 121], [1212, 318, 257, 1332, 6827, 13],
        [18435], [15496, 220, 995, 220], [10163, 2231, 1343, 718, 3695, 796, 11323, 1954],
        [40, 1101, 994, 0, 198, 198, 3791, 1627, 197, 33349],
        [4299, 277, 7, 87, 2599, 198, 220, 220, 220, 1441, 2124, 1174, 17]],
    "aquila": [
        [22299, 3117], [22299, 3117, 12, 221, 34856], [3077, 397, 262, 2215, 11494, 14], [51980],
        [22299, 221, 3117, 221], [36038, 1033, 1433, 4634, 681, 19723, 2035],
        [41, 2794, 2180, 1, 199, 199, 7984, 2813, 198, 19236],
        [3196, 297, 8, 88, 3493, 851, 2256, 2599, 671, 18]],
}

VOCAB = {"llama2/tokenizer.model": 32000, "llama3/tokenizer.model": 128256,
         "mistral/tokenizer.model.v1": 32000, "mistral/mistral_instruct_tokenizer_240323.model.v3": 32768,
         "qwen/qwen.tiktoken": 151851, "internlm/V7_sft.model": 103168, "gpt2": 50257, "aquila": 100000}


@pytest.fixture(scope="module")
def toks():
    root = shared_data() / "tokenizers"
    return {name: load_tokenizer(root / name) for name in KNOWN}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_encodings(toks, name):
    tok = toks[name]
    assert tok.vocab_size == VOCAB[name]
    for s, want in zip(S, KNOWN[name]):
        assert tok.encode(s) == want, (name, s)
        assert tok.decode(want) == s, (name, s)


def test_special_token_encodings(toks):
    l3 = toks["llama3/tokenizer.model"]
    assert l3.encode(S[2], bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nThis is a test sentence.<|eot_id|>"
    assert l3.encode(text, allow_special=True) == [128000, 128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
    # Without allow_special the markers are plain text (user content cannot forge control ids).
    assert 128006 not in l3.encode(text)
    q = toks["qwen/qwen.tiktoken"]
    chat = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert q.encode(chat, allow_special=True) == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198,
                                                  151644, 872, 198, 108386, 151645, 198, 151644, 77091, 198]
    assert q.bos_id is None and q.eos_id == 151643
    il = toks["internlm/V7_sft.model"]
    assert il.encode("你好", bos=True) == [1, 76379]
    assert il.special_tokens["<eoh>"] == 103027 and il.special_tokens["<eoa>"] == 103028
    prompt = "<|User|>:你好<eoh>\n<|Bot|>:你好，有什么我可以帮助你的吗？<eoa>\n<|User|>:晚上睡不着应该怎么办<eoh>\n<|Bot|>:"
    assert il.encode(prompt, bos=True) == [
        1, 333, 352, 1621, 352, 27232, 76379, 103027, 364, 333, 352, 23845, 352, 27232, 76379, 98899, 68408,
        73159, 67566, 67513, 61056, 99050, 103028, 364, 333, 352, 1621, 352, 27232, 67891, 76046, 67551, 68573,
        103027, 364, 333, 352, 23845, 352, 27232]
    v3 = toks["mistral/mistral_instruct_tokenizer_240323.model.v3"]
    assert v3.special_tokens["[INST]"] == 3 and v3.special_tokens["[/INST]"] == 4
    assert v3.encode("[INST] Hello [/INST]") == [1501, 17057, 29561, 23325, 1501, 29516, 17057, 29561]
    assert toks["mistral/tokenizer.model.v1"].encode("[INST] Hello [/INST]") == [733, 16289, 28793, 22557, 733, 28748, 16289, 28793]
    assert toks["gpt2"].eos_id == 50256


def test_stories260k_tokenizer():
    tok = load_tokenizer(shared_data() / "models" / "stories260K")
    assert tok.vocab_size == 512 and tok.bos_id == 1 and tok.eos_id == 2
    text = (shared_data() / "pretrain" / "tinystories_train_2MiB.txt").read_text(encoding="utf-8")[:20000]
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_round_trip_fixtures(toks):
    tok = toks["gpt2"]
    for name in ("test_address.txt", "test_german.txt"):
        text = (shared_data() / "tokenizers" / "gpt2" / name).read_text(encoding="utf-8")
        assert tok.decode(tok.encode(text)) == text


def test_bpe_ranks_match_tiktoken_on_long_text(toks):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    from pmodel.data.tokenizers import LLAMA3_PATTERN, QWEN_PATTERN, llama3_special_tokens, qwen_special_tokens

    text = (shared_data() / "pretrain" / "wiki_demo.txt").read_text(encoding="utf-8")[:30000] + " 12345678 ÅÄÖ ﬁ 👍🏽"
    for name, pat, specials in (("llama3/tokenizer.model", LLAMA3_PATTERN, llama3_special_tokens()),
                                ("qwen/qwen.tiktoken", QWEN_PATTERN, qwen_special_tokens())):
        path = shared_data() / "tokenizers" / name
        enc = tiktoken.Encoding(name=name, pat_str=pat, mergeable_ranks=load_tiktoken_bpe(str(path)),
                                special_tokens=specials)
        ours = toks[name].encode(text)
        assert ours == enc.encode(text, disallowed_special=()), name
        assert toks[name].decode(ours) == text


def test_vocab_size_check(toks, tmp_path):
    tok = toks["llama2/tokenizer.model"]
    check_vocab_size(tok, 32000)
    check_vocab_size(tok, 32064)  # padded embedding is fine
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*tokenizer.model.*32000.*31999|vocabulary mismatch"):
        check_vocab_size(tok, 512)
    with pytest.raises(ValueError, match="vocab_size is 512"):
        load_tokenizer(shared_data() / "tokenizers" / "llama2" / "tokenizer.model", vocab_size=512)


# -- no shared data needed -----------------------------------------------------------------


def test_byte_tokenizer():
    tok = ByteTokenizer(specials=["<|im_start|>"])
    ids = tok.encode("héllo<|im_start|>x", allow_special=True, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.special_tokens["<|im_start|>"] in ids
    assert tok.decode(ids) == "<s>héllo<|im_start|>x</s>"
    assert tok.special_tokens["<|im_start|>"] not in tok.encode("<|im_start|>")
    assert load_tokenizer(None).vocab_size == 259


def test_tiny_sentencepiece_continuation(tmp_path):
    path = train_tiny_sentencepiece(tmp_path, user_defined=["<sep>"], control=["[INST]"])
    tok = load_tokenizer(path)
    assert tok.add_dummy_prefix
    assert "<sep>" in tok.special_tokens and "[INST]" in tok.special_tokens
    whole = tok.encode("hello world the quick")
    assert tok.encode("hello world") + tok.encode_continuation(" the quick") == whole
    assert tok.decode(whole) == "hello world the quick"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("aGVsbG8= 0\nnot-base64!! x\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2"):
        load_tokenizer(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(empty)
