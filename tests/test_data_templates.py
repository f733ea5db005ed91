"""Chat templates: golden strings, exact prompt masking, whole-turn truncation, packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pmodel.data import (IGNORE_INDEX, TEMPLATES, ByteTokenizer, CollatorConfig, Message, collate,
                         encode_record, greedy_knapsack, load_tokenizer, pack_examples, render, render_text,
                         shift_example, truncate_turns)
from tests._data_helpers import shared_data, train_tiny_sentencepiece

CONV = [Message(role="system", content="S"), Message(role="user", content="U1"),
        Message(role="assistant", content="A1"), Message(role="user", content="U2"),
        Message(role="assistant", content="A2")]

GOLDEN = {
    "empty": "S\n\nU1A1</s>U2A2</s>",
    "default": "S\nHuman: U1\nAssistant:A1</s>\nHuman: U2\nAssistant:A2</s>",
    "alpaca": "S### Instruction:\nU1\n\n### Response:A1</s>\n\n### Instruction:\nU2\n\n### Response:A2</s>",
    "llama2": "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 </s><s>[INST] U2 [/INST] A2 </s>",
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
               "A1<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>"),
    "mistral": "<s>[INST] S\n\nU1 [/INST]A1</s>[INST] U2 [/INST]A2</s>",
    "chatml": ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
               "<|im_start|>user\nU2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"),
    "chatglm3": "[gMASK]sop<|system|>\nS<|user|>\nU1<|assistant|>\nA1<|user|>\nU2<|assistant|>\nA2</s>",
    "gemma": ("<bos><start_of_turn>user\nS\n\nU1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
              "<start_of_turn>user\nU2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n"),
}
BOS = {"llama3": "<|begin_of_text|>", "gemma": "<bos>"}
RESPONSES = {  # the labelled text of each template, turn by turn
    "empty": ["A1</s>", "A2</s>"], "default": ["A1</s>", "A2</s>"], "alpaca": ["A1</s>", "A2</s>"],
    "llama2": [" A1 </s>", " A2 </s>"], "llama3": ["A1<|eot_id|>", "A2<|eot_id|>"],
    "mistral": ["A1</s>", "A2</s>"], "chatml": ["A1<|im_end|>", "A2<|im_end|>"],
    "chatglm3": ["\nA1", "\nA2</s>"], "gemma": ["A1<end_of_turn>", "A2<end_of_turn>"],
}


def _all_specials():
    return sorted({s for t in TEMPLATES.values() for s in t.specials})


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_rendered_strings(name):
    assert render_text(name, CONV, bos=BOS.get(name, "<s>")) == GOLDEN[name]
    assert set(TEMPLATES) >= {"alpaca", "llama2", "llama3", "mistral", "chatml", "qwen", "chatglm3", "gemma",
                              "empty", "default"}


def test_alpaca_stanford_format():
    rec = {"instruction": "Add.", "input": "1 + 1", "output": "2"}
    msgs_text = render_text("alpaca", [Message(role="user", content=TEMPLATES["alpaca"].join_input("Add.", "1 + 1")),
                                       Message(role="assistant", content="2")], with_input=True)
    assert msgs_text == ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                         "Add.\n\n### Input:\n1 + 1\n\n### Response:2</s>")
    tok = ByteTokenizer()
    r = encode_record(rec, tok, "alpaca")
    assert tok.decode(r.ids) == msgs_text
    r2 = encode_record({"instruction": "Say hi.", "output": "hi"}, tok, "alpaca")
    assert tok.decode(r2.ids) == ("Below is an instruction that describes a task. Write a response that appropriately "
                                  "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:hi</s>")


# tatsu-lab/stanford_alpaca train.py PROMPT_DICT, verbatim.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def test_alpaca_equals_stanford_train_py_on_llama2():
    """train.py's preprocess: tokenizer(source + output + eos) with labels masked on
    len(tokenizer(source)); the LLaMA tokenizer call is BOS + sentencepiece, "</s>" -> EOS."""
    import sentencepiece as spm

    from tests._data_helpers import shared_data

    root = shared_data()
    recs = json.loads((root / "sft" / "alpaca" / "alpaca_data_first1000.json").read_text(encoding="utf-8"))[:200]
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / "llama2" / "tokenizer.model"))
    tok = load_tokenizer(root / "tokenizers" / "llama2")
    same = 0
    for rec in recs:
        source = PROMPT_DICT["prompt_input" if rec.get("input", "") != "" else "prompt_no_input"].format_map(rec)
        want_ids = [1] + sp.encode(source + rec["output"]) + [2]
        n = 1 + len(sp.encode(source))
        want_labels = [IGNORE_INDEX] * n + want_ids[n:]
        r = encode_record(rec, tok, "alpaca")
        assert r.ids[-1] == 2 and tok.decode(r.ids) == source + rec["output"]  # (SentencePiece drops BOS/EOS)
        same += (r.ids, r.labels) == (want_ids, want_labels)
    assert same == len(recs)


@pytest.mark.parametrize("name", sorted(GOLDEN))
@pytest.mark.parametrize("turns", [1, 2])
def test_labels_exactly_on_responses(name, turns):
    tok = ByteTokenizer(specials=_all_specials() + ["<|begin_of_text|>", "<bos>", "[gMASK]", "sop"])
    conv = CONV[:1 + 2 * turns]
    r = render(tok, name, conv)
    # bos/eos of ByteTokenizer are <s> / </s>; its [INST] is a special id, so mistral folds the
    # system text into the last user turn (mistral-common v2 / v3)
    assert tok.decode(r.ids) == render_text(name, conv, fold_last=name == "mistral")
    lab = np.asarray(r.labels)
    ids = np.asarray(r.ids)
    on = lab != IGNORE_INDEX
    np.testing.assert_array_equal(lab[on], ids[on])
    # the labelled spans are exactly the responses, in order, and nothing else
    spans, cur = [], []
    for i, o in zip(ids, on):
        if o:
            cur.append(int(i))
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    want = RESPONSES[name][:turns]
    if turns == 1 and name == "chatglm3":
        want = ["\nA1</s>"]
    assert [tok.decode(s) for s in spans] == want
    # role markers map to their special ids
    for s in TEMPLATES[name].specials:
        if s in GOLDEN[name]:
            assert tok.special_tokens[s] in r.ids


def test_sentencepiece_segments_and_truncation(tmp_path):
    tok = load_tokenizer(train_tiny_sentencepiece(tmp_path))
    conv = [Message(role="user", content="hello world"), Message(role="assistant", content="the quick brown fox"),
            Message(role="user", content="lazy dog"), Message(role="assistant", content="jumps over")]
    r = render(tok, "llama2", conv)
    assert tok.decode(r.ids) == "[INST] hello world [/INST] the quick brown fox [INST] lazy dog [/INST] jumps over"
    labelled = [i for i, l in zip(r.ids, r.labels) if l != IGNORE_INDEX]
    assert tok.decode(labelled).replace(" ", "") == "thequickbrownfoxjumpsover"
    assert len(r.turn_ends) == 2
    t = truncate_turns(r, r.turn_ends[0] + 3)
    assert t.ids == r.ids[:r.turn_ends[0]] and t.labels == r.labels[:r.turn_ends[0]]
    assert truncate_turns(r, r.turn_ends[0] - 1) is None


def test_real_tokenizers_chat_ids():
    root = shared_data() / "tokenizers"
    q = load_tokenizer(root / "qwen" / "qwen.tiktoken")
    r = render(q, "qwen", [Message(role="system", content="You are a helpful assistant."),
                           Message(role="user", content="你好")])
    assert r.ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 108386,
                     151645, 198, 151644, 77091, 198]
    l3 = load_tokenizer(root / "llama3" / "tokenizer.model")
    r = render(l3, "llama3", [Message(role="user", content="This is a test sentence.")])
    assert r.ids[:12] == [128000, 128006, 882, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009]
    l2 = load_tokenizer(root / "llama2" / "tokenizer.model")
    conv = [Message(role="system", content="Be nice."), Message(role="user", content="Hi there"),
            Message(role="assistant", content="Hello! How can I help?"), Message(role="user", content="A joke"),
            Message(role="assistant", content="No.")]
    r = render(l2, "llama2", conv)  # equals Meta's generation.py encoding, turn by turn
    ref = ([1] + l2.encode("[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? ") + [2]
           + [1] + l2.encode("[INST] A joke [/INST] No. ") + [2])
    assert r.ids == ref
    v3 = load_tokenizer(root / "mistral" / "mistral_instruct_tokenizer_240323.model.v3")
    r = render(v3, "mistral", conv[1:3])  # as mistral-common: [INST] sp(u) [/INST] sp(a) </s>
    assert r.ids == [1, 3] + v3.encode("Hi there") + [4] + v3.encode("Hello! How can I help?") + [2]


def test_model_template_details_on_real_tokenizers():
    root = shared_data() / "tokenizers"
    conv = [Message(role="system", content="Be brief."), Message(role="user", content="Hi there"),
            Message(role="assistant", content="Hello!"), Message(role="user", content="A joke"),
            Message(role="assistant", content="No.")]
    # mistral-common InstructTokenizerV1: BOS, encode("[INST] {system}\n\n{first user} [/INST]"),
    # encode(answer) + EOS (a separate call: the answer gets SentencePiece's space) per turn
    v1 = load_tokenizer(root / "mistral" / "tokenizer.model.v1")
    want = ([1] + v1.encode("[INST] Be brief.\n\nHi there [/INST]") + v1.encode("Hello!") + [2]
            + v1.encode("[INST] A joke [/INST]") + v1.encode("No.") + [2])
    assert render(v1, "mistral", conv).ids == want
    # v3 (InstructTokenizerV2/V3): control [INST]; the system prompt joins the *last* user message
    v3 = load_tokenizer(root / "mistral" / "mistral_instruct_tokenizer_240323.model.v3")
    want = ([1, 3] + v3.encode("Hi there") + [4] + v3.encode("Hello!") + [2]
            + [3] + v3.encode("Be brief.\n\nA joke") + [4] + v3.encode("No.") + [2])
    assert render(v3, "mistral", conv).ids == want
    # Llama-3 chat_template trims every message
    l3 = load_tokenizer(root / "llama3" / "tokenizer.model")
    padded = [Message(role=m.role, content=f"  {m.content}\n ") for m in conv]
    assert render(l3, "llama3", padded).ids == render(l3, "llama3", conv).ids
    # ChatML (Qwen1.5 chat_template): every message, the last included, ends "<|im_end|>\n"
    q = load_tokenizer(root / "qwen" / "qwen.tiktoken")
    r = render(q, "chatml", conv)
    text = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in conv)
    assert r.ids == q.encode(text, allow_special=True) and r.ids[-2:] == [151645, 198] and r.labels[-1] == -100


def test_sharegpt_and_alpaca_history_multi_turn():
    tok = ByteTokenizer(specials=["<|im_start|>", "<|im_end|>"])
    rec = {"conversations": [{"from": "system", "value": "Sys"}, {"from": "human", "value": "q1"},
                             {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                             {"from": "gpt", "value": "a2"}]}
    r = encode_record(rec, tok, "chatml", style="sharegpt")
    assert tok.decode(r.ids).startswith("<|im_start|>system\nSys<|im_end|>")
    assert tok.decode([i for i, l in zip(r.ids, r.labels) if l != IGNORE_INDEX]) == "a1<|im_end|>a2<|im_end|>"
    alp = {"instruction": "q2", "output": "a2", "history": [["q1", "a1"]], "system": "Sys"}
    r2 = encode_record(alp, tok, "chatml")
    assert r2.ids == r.ids and r2.labels == r.labels
    mapped = encode_record({"prompt": "q2", "response": "a2"}, tok, "chatml",
                           map_keys={"instruction": "prompt", "output": "response"})
    assert tok.decode(mapped.ids).endswith("q2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n")


def test_knapsack_and_collate_packed():
    lengths = [7, 3, 5, 2, 8, 1, 4]
    bins = greedy_knapsack(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    exs = [shift_example(list(range(1, n + 2)), [IGNORE_INDEX] * 2 + list(range(3, n + 2))) for n in (3, 4)]
    packed = pack_examples(exs)
    b = collate([packed, exs[0]], CollatorConfig(seq_length=8, pad_id=0))
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert b["cu_seqlens"].tolist() == [0, 3, 7, 8, 11, 16]
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert b["labels"][0].tolist() == [IGNORE_INDEX, 3, 4, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX]
    assert b["loss_mask"][0].tolist() == [0, 1, 1, 0, 1, 1, 1, 0]
    left = collate([exs[0]], CollatorConfig(seq_length=5, padding_side="left"))
    assert left["attention_mask"][0].tolist() == [0, 0, 1, 1, 1] and left["cu_seqlens"].tolist() == [0, 2, 5]


# -- a packed batch gives the same per-sample losses as the samples run one at a time -------


def _per_sample_losses(logits, batch, seq_bounds):
    """Mean CE over labelled tokens of each (row, start, end) sample."""
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="none").view(batch["labels"].shape)
    out = []
    for row, a, b in seq_bounds:
        m = batch["loss_mask"][row, a:b]
        out.append((ce[row, a:b] * m).sum() / m.sum())
    return torch.stack(out)


def _tiny_reference_lm(vocab, dim=16, seed=0):
    """A 1-layer causal attention LM written here; masks by position ids + cu_seqlens documents."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(vocab, dim, generator=g)
    pos = torch.randn(64, dim, generator=g)
    wq, wk, wv, wo = (torch.randn(dim, dim, generator=g) / dim ** 0.5 for _ in range(4))

    def apply(tokens, position_ids, cu_seqlens):
        B, T = tokens.shape
        x = emb[tokens] + pos[position_ids]  # (B, T, D)
        doc = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(B * T), right=True).view(B, T)  # (B, T)
        same = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        att = (x @ wq) @ (x @ wk).transpose(1, 2) / dim ** 0.5  # (B, T, T)
        att = att.masked_fill(~(same & causal), float("-inf")).softmax(-1)
        h = x + (att @ (x @ wv)) @ wo  # (B, T, D)
        return h @ emb.T  # (B, T, V)

    return apply


def _packing_case():
    rng = np.random.default_rng(0)
    exs = []
    for n in (9, 5, 12, 6):
        ids = rng.integers(3, 200, size=n).tolist()
        k = int(rng.integers(1, n - 2))
        exs.append(shift_example(ids, [IGNORE_INDEX] * k + ids[k:]))
    lengths = [len(e["tokens"]) for e in exs]
    bins = greedy_knapsack(lengths, 16)
    assert len(bins) < len(exs)  # something actually got packed
    packed_rows = [pack_examples([exs[i] for i in sorted(b)]) for b in bins]
    packed = collate(packed_rows, CollatorConfig(seq_length=16))
    bounds, order = [], []
    for r, b in enumerate(bins):
        start = 0
        for i in sorted(b):
            bounds.append((r, start, start + lengths[i]))
            order.append(i)
            start += lengths[i]
    return exs, packed, bounds, order


def test_packed_losses_equal_unpacked_reference_model():
    exs, packed, bounds, order = _packing_case()
    lm = _tiny_reference_lm(256)
    packed_losses = _per_sample_losses(lm(packed["tokens"], packed["position_ids"], packed["cu_seqlens"]),
                                       packed, bounds)
    for k, i in enumerate(order):
        single = collate([exs[i]])
        one = _per_sample_losses(lm(single["tokens"], single["position_ids"], single["cu_seqlens"]), single,
                                 [(0, 0, len(exs[i]["tokens"]))])
        torch.testing.assert_close(packed_losses[k], one[0], rtol=1e-5, atol=1e-5)


def test_packed_losses_equal_unpacked_pmodel():
    try:
        import pmodel

        model = pmodel.families.preset("debug")
        params = pmodel.init(model, seed=0)
    except Exception as e:  # the model is developed alongside; the reference test above always runs
        pytest.skip(f"pmodel model not available: {type(e).__name__}: {e}")
    exs, packed, bounds, order = _packing_case()
    with torch.no_grad():
        logits = model.apply(params, packed["tokens"], position_ids=packed["position_ids"],
                             cu_seqlens=packed["cu_seqlens"])
        packed_losses = _per_sample_losses(logits, packed, bounds)
        for k, i in enumerate(order):
            single = collate([exs[i]])
            lg = model.apply(params, single["tokens"], position_ids=single["position_ids"])
            one = _per_sample_losses(lg, single, [(0, 0, len(exs[i]["tokens"]))])
            torch.testing.assert_close(packed_losses[k], one[0], rtol=1e-4, atol=1e-5)
