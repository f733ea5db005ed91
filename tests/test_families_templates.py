"""Family chat templates against the official prompt builders, on the real tokenizers.

References run here: ChatGLM3 ``ChatGLMTokenizer.build_chat_input`` / ``build_single_message``,
Baichuan2 ``generation_utils.build_chat_input``, Baichuan-13B-Chat ``_build_chat_input``,
Qwen ``make_context``, InternLM ``build_inputs`` (all from ../shared/data/reference_code), and the
id lists recorded in ../shared/data/tokenizers/README.md (chatglm.cpp's tests). Checked: the
prompt ids, a full conversation's ids, and that the labels cover exactly the responses.
"""
from __future__ import annotations

import types

import pytest

from pmodel import families
from pmodel.data import IGNORE_INDEX, Message, load_tokenizer, render
from tests._data_helpers import shared_data
from tests.test_families_tokenizers import _module, official

U, A = "user", "assistant"
# Mixed content; leading whitespace / newlines show whether parts are tokenised separately.
CONV = [Message(role="system", content="You are 助手. Answer briefly 🙂"),
        Message(role=U, content="Hello 世界! what is 2+2?"), Message(role=A, content="4。 The answer is `2+2=4` 👍"),
        Message(role=U, content="\n  def f(x):\n    return x  # 代码"), Message(role=A, content="  It returns x.\n")]


def tok(name):
    return load_tokenizer(shared_data() / "tokenizers" / name)


def _responses(r):
    spans, cur = [], []
    for i, lab in zip(r.ids, r.labels):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def _d(m: Message) -> dict:
    return {"role": m.role, "content": m.content}


# --------------------------------------------------------------------------- ChatGLM3


def test_chatglm3_readme_ids():
    t = tok("chatglm3")
    assert render(t, "chatglm3", [Message(role=U, content="你好")]).ids == [
        64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]
    conv = [Message(role=U, content="你好"),
            Message(role=A, content="你好👋！我是人工智能助手 ChatGLM3-6B，很高兴见到你，欢迎问我任何问题。"),
            Message(role=U, content="晚上睡不着应该怎么办")]
    assert render(t, "chatglm3", conv).ids == [
        64790, 64792, 64795, 30910, 13, 36474, 54591, 64796, 30910, 13, 36474, 54591, 243, 162, 148, 142, 31404,
        33030, 34797, 42481, 22011, 10461, 30944, 30966, 30941, 30978, 30949, 31123, 48895, 35214, 54622, 31123,
        32616, 39905, 31901, 31639, 31155, 64795, 30910, 13, 30910, 32820, 54266, 31876, 35153, 64796]


@pytest.mark.parametrize("first,n", [(1, 2), (0, 2), (0, 4)])
def test_chatglm3_equals_build_chat_input(first, n):
    ref, t = official("chatglm3"), tok("chatglm3")
    conv = CONV[first:n]  # a prompt: ends with a user message
    want = ref.build_chat_input(conv[-1].content, history=[_d(m) for m in conv[:-1]], role=U)["input_ids"][0].tolist()
    assert render(t, "chatglm3", conv).ids == want
    # A full conversation: every message is build_single_message, then one EOS (finetune_demo);
    # labels are the assistant messages after their role id, and the final EOS.
    full = render(t, "chatglm3", CONV)
    msgs = [ref.build_single_message(m.role, "", m.content) for m in CONV]
    assert full.ids == ref.get_prefix_tokens() + sum(msgs, []) + [ref.eos_token_id]
    want_spans = [msgs[2][1:], msgs[4][1:] + [ref.eos_token_id]]
    assert _responses(full) == want_spans


# --------------------------------------------------------------------------- Baichuan


def _baichuan_ref(name):
    if name == "baichuan2":
        build = _module("baichuan2_13b", "generation_utils").build_chat_input
    else:
        import _remote_code as R  # tests/ is on sys.path (conftest)
        cls = R.load("baichuan_13b_v1").BaichuanForCausalLM

        def build(model, tokenizer, messages, max_new_tokens=0):
            return cls._build_chat_input(model, tokenizer, messages, max_new_tokens)
    model = types.SimpleNamespace(  # what the builders read from the model (generation_config.json)
        generation_config=types.SimpleNamespace(user_token_id=195, assistant_token_id=196, eos_token_id=2,
                                                max_new_tokens=2048),
        config=types.SimpleNamespace(model_max_length=4096), device="cpu")
    return lambda tokenizer, messages: build(model, tokenizer, messages)[0].tolist()


README_BAICHUAN = {
    "baichuan2": [195, 16829, 94278, 196, 16829, 67, 52160, 10329, 3341, 66, 23216, 5817, 92392, 21777, 2193, 93122,
                  68, 195, 92430, 93410, 1747, 6642, 68, 196],
    "baichuan": [195, 9875, 31213, 32889, 196, 9875, 31213, 74, 17318, 31906, 14822, 5536, 73, 20389, 7713, 31182,
                 1231, 4090, 2689, 31763, 75, 195, 9875, 32177, 1534, 10240, 75, 196],
}


@pytest.mark.parametrize("name", ["baichuan", "baichuan2"])
def test_baichuan_equals_build_chat_input(name):
    t, ref_tok = tok(name), official(name)
    build = _baichuan_ref(name)
    conv = [Message(role=U, content="你好呀"), Message(role=A, content="你好！很高兴和你交流。请问有什么我可以帮助你的吗？"),
            Message(role=U, content="你叫什么名字？")]
    ids = render(t, name, conv).ids
    if name == "baichuan":  # the official v1 builder ends assistant turns with EOS; chatglm.cpp's list has none
        assert ids.count(2) == 1 and ids[ids.index(2) - 1] == 75
        ids.remove(2)
    assert ids == README_BAICHUAN[name]
    for n in (2, 4):  # prompts (ending with a user message)
        msgs = CONV[:n] if name == "baichuan2" else CONV[1:n]  # v1's builder has no system message
        assert render(t, name, msgs).ids == build(ref_tok, [_d(m) for m in msgs]), n
    full = render(t, name, CONV if name == "baichuan2" else CONV[1:])
    spans = _responses(full)
    assert spans == [t.encode(CONV[2].content) + ([] if name == "baichuan2" else [2]),
                     t.encode(CONV[4].content) + [t.eos_id]]


def test_baichuan_template_refuses_the_other_vocabulary():
    with pytest.raises(ValueError, match=r"'<reserved_106>' = id 195.*id 199"):
        render(tok("baichuan"), "baichuan2", [Message(role=U, content="hi")])
    with pytest.raises(ValueError, match=r"'<reserved_102>' = id 195.*id 191"):
        render(tok("baichuan2"), "baichuan", [Message(role=U, content="hi")])


# --------------------------------------------------------------------------- Qwen


@pytest.mark.parametrize("n", [2, 4])
def test_qwen_equals_make_context(n):
    make_context = _module("qwen", "qwen_generation_utils").make_context
    ref, t = official("qwen"), tok("qwen")
    conv = CONV[:n]
    history = [(conv[k].content, conv[k + 1].content) for k in range(1, n - 1, 2)]
    _, want = make_context(ref, conv[-1].content, history=history, system=conv[0].content, chat_format="chatml")
    assert render(t, "qwen", conv).ids == want
    # default system message as QWenLMHeadModel.chat: "You are a helpful assistant."
    _, want = make_context(ref, "hi", history=[], system="You are a helpful assistant.")
    assert render(t, "qwen", [Message(role=U, content="hi")]).ids == want
    full = render(t, "qwen", CONV)
    assert _responses(full) == [t.encode(CONV[2].content) + [151645], t.encode(CONV[4].content) + [151645]]


# --------------------------------------------------------------------------- InternLM


def test_internlm_readme_and_build_inputs():
    R = pytest.importorskip("_remote_code")
    t, ref = tok("internlm"), official("internlm")
    conv = [Message(role=U, content="你好"), Message(role=A, content="你好，有什么我可以帮助你的吗？"),
            Message(role=U, content="晚上睡不着应该怎么办")]
    assert render(t, "internlm", conv).ids == [  # chatglm.cpp's InternLM test
        1, 333, 352, 1621, 352, 27232, 76379, 103027, 364, 333, 352, 23845, 352, 27232, 76379, 98899, 68408,
        73159, 67566, 67513, 61056, 99050, 103028, 364, 333, 352, 1621, 352, 27232, 67891, 76046, 67551, 68573,
        103027, 364, 333, 352, 23845, 352, 27232]
    cls = R.load("internlm").InternLMForCausalLM
    for msgs in (conv[:1], conv, CONV[1:4]):
        history = [(msgs[k].content, msgs[k + 1].content) for k in range(0, len(msgs) - 1, 2)]
        want = cls.build_inputs(None, ref, msgs[-1].content, history)["input_ids"][0].tolist()
        # the remote code's tokenizer call adds BOS before the prompt's literal "<s>": one BOS here
        assert want[:2] == [1, 1] and render(t, "internlm", msgs).ids == want[1:]
    full = render(t, "internlm", CONV[1:])
    assert _responses(full) == [t.encode(CONV[2].content) + [103028], t.encode(CONV[4].content) + [103028]]


def test_internlm2_readme_ids():
    t = tok("internlm2")
    assert render(t, "internlm2", [Message(role=U, content="你好")]).ids == [
        1, 92543, 1008, 364, 77230, 92542, 364, 92543, 525, 11353, 364]
    full = render(t, "internlm2", CONV)
    assert full.ids[:2] == [1, 92543] and _responses(full)[1] == t.encode_continuation(CONV[4].content) + [92542]


def test_family_default_templates():
    want = {"chatglm": "chatglm3", "baichuan": "baichuan2", "qwen": "qwen", "internlm": "internlm",
            "qwen2": "chatml", "gemma": "gemma"}
    assert {f: families.get(f).chat_template for f in want} == want
