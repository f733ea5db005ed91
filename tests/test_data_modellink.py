"""ModelLink's preprocess_data handlers and flags: every handler on a small sample in its native
format, checked against ModelLink's formulas (transcribed below from modellink/data/
data_handler.py and prompter.py at 9252dc9) with the tokenizer the reference calls, and read
back with megatron-core's reader; the llama2 data_convert example run unchanged but for paths."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from pmodel.data import IndexedDataset, PreprocessConfig, PreprocessError, load_tokenizer, preprocess
from pmodel.data.tokenizers import HFTokenizer, SentencePieceTokenizer
from tests._data_helpers import shared_data

ROOT = Path(__file__).resolve().parents[1]

# -- the reference, transcribed (ModelLink data_handler.py / prompter.py) --------------------
SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request. "
          "Please note that you need to think through your response logically and step by step.")


def ref_prompt(messages):  # Prompter(AlpacaTemplate()).generate_training_prompt
    prompt = "" + "\n" + SYSTEM + "" + "\n"
    for m in messages:
        if m["role"] == "user":
            prompt += "### Instruction:" + "\n" + m["content"] + "" + "\n"
        else:
            prompt += "### Response:" + "\n" + m["content"] + "" + "\n"
    return prompt


def ref_filter(sp, full_prompt, append_eod=False):  # GeneralInstructionHandler._filter
    def tokenize(text):  # the HF Llama tokenizer call: BOS + sentencepiece
        return [sp.bos_id()] + sp.encode(text)
    ids = tokenize(full_prompt)
    labels = ids.copy()
    if append_eod:
        ids.append(sp.eos_id())
        labels.append(sp.eos_id())
    user_prompt = full_prompt.rsplit("### Response:", maxsplit=1)[0] + "### Response:" + "\n"
    n = len(tokenize(user_prompt))
    labels[:n] = [-100] * n
    return ids, labels


def _sp(name="llama2"):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(shared_data() / "tokenizers" / name / "tokenizer.model"))


def _run(tmp_path, handler, records, tok="llama2", suffix=".jsonl", **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / f"in{suffix}"
    if suffix == ".json":
        src.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    else:
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    cfg = PreprocessConfig(inputs=(str(src),), output_prefix=str(tmp_path / "out"), handler=handler,
                           tokenizer=str(shared_data() / "tokenizers" / tok), progress=False, log_interval=0, **kw)
    return cfg, preprocess(cfg)


def _megatron(prefix):
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed

    return MIndexed(str(prefix))


def _docs(prefix):
    """Documents as lists of sequences, read by megatron-core's reader (checked against ours)."""
    m, ours = _megatron(prefix), IndexedDataset(prefix)
    docs = []
    for d in range(len(m.document_indices) - 1):
        a, b = int(m.document_indices[d]), int(m.document_indices[d + 1])
        seqs = [m[i].tolist() for i in range(a, b)]
        assert seqs == [s.tolist() for s in ours.document(d)]
        docs.append(seqs)
    return docs


def _instruction_docs(tmp_path):
    p = tmp_path / "out_packed"
    ids, labels, mask = (_docs(f"{p}_{k}_document") for k in ("input_ids", "labels", "attention_mask"))
    assert [[len(s) for s in d] for d in ids] == [[len(s) for s in d] for d in labels]
    assert all(all(v == 1 for s in d for v in s) for d in mask)
    return ids, labels


def test_general_instruction_handler_is_modellink_alpaca(tmp_path):
    recs = json.loads((shared_data() / "sft" / "alpaca" / "alpaca_data_first1000.json").read_text(encoding="utf-8"))[:30]
    cfg, rep = _run(tmp_path, "GeneralInstructionHandler", recs, suffix=".json", append_eod=True, workers=2)
    assert rep.written == 30 and not rep.rejected
    ids, labels = _instruction_docs(tmp_path)
    sp = _sp()
    for r, di, dl in zip(recs, ids, labels):
        msgs = [{"role": "user", "content": r["instruction"] + "\n" + r["input"]},
                {"role": "assistant", "content": r["output"]}]
        want_ids, want_labels = ref_filter(sp, ref_prompt(msgs), append_eod=True)
        assert di == [want_ids] and dl == [want_labels]


def test_belle_leetcode_and_moss_instruction_handlers(tmp_path):
    sp = _sp()
    belle = [{"instruction": "Human: 你好\nAssistant: 你好！\nHuman: What is 2+2?\nAssistant: ", "input": "",
              "output": " 4 "},
             {"instruction": "Human: Say hi.\nAssistant:", "input": "", "output": "hi"}]
    _run(tmp_path / "b", "BelleMultiTurnInstructionHandler", belle)
    ids, labels = _instruction_docs(tmp_path / "b")
    want = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
             {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
            [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]]
    for msgs, di, dl in zip(want, ids, labels):
        assert (di, dl) == tuple([x] for x in ref_filter(sp, ref_prompt(msgs)))

    leet = [{"code_with_problem": "Two sum.\nGiven nums...\n```python\ndef f(): pass\n```",
             "code_only": "```python\ndef f(): pass\n```", "explanation_only": "Use a dict."}]
    _run(tmp_path / "l", "LeetcodePythonInstructionHandler", leet)
    ids, labels = _instruction_docs(tmp_path / "l")
    msgs = [{"role": "user", "content": "Two sum.\nGiven nums..."},
            {"role": "assistant", "content": leet[0]["code_only"] + "\n" + leet[0]["explanation_only"]}]
    assert (ids[0], labels[0]) == tuple([x] for x in ref_filter(sp, ref_prompt(msgs)))

    moss = [{"conversation_id": 1, "chat": {
        "turn_1": {"Human": "<|Human|>: Hello<eoh>\n", "MOSS": "<|MOSS|>: Hi there<eom>\n"},
        "turn_2": {"Human": "<|Human|>: 你好吗<eoh>\n", "MOSS": "<|MOSS|>: 很好<eom>\n"},
        "turn_3": None}}]
    _run(tmp_path / "m", "MOSSInstructionHandler", moss)
    ids, labels = _instruction_docs(tmp_path / "m")
    msgs, want_i, want_l = [], [], []
    for u, a in (("Hello", "Hi there"), ("你好吗", "很好")):
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        i, lab = ref_filter(sp, ref_prompt(msgs))
        want_i.append(i)
        want_l.append(lab)
    assert ids == [want_i] and labels == [want_l]  # one document, one sequence per turn


def test_moss_multi_turn_handler_on_baichuan2(tmp_path):
    sp = _sp("baichuan2")
    moss = [{"chat": {"turn_1": {"Human": "<|Human|>: 你好<eoh>\n", "MOSS": "<|MOSS|>: 您好！<eom>\n"},
                      "turn_2": {"Human": "<|Human|>: 1+1?<eoh>\n", "MOSS": "<|MOSS|>: 2<eom>\n"}}}]
    _run(tmp_path, "MOSSMultiTurnHandler", moss, tok="baichuan2")
    ids, labels = _instruction_docs(tmp_path)
    # MOSSMultiTurnHandler._filter with Baichuan2's HF tokenizer (.encode: add_bos_token false)
    eos, wi, wl = sp.eos_id(), [], []
    for u, a in (("你好", "您好！"), ("1+1?", "2")):
        u_ids, a_ids = sp.encode(u), sp.encode(a)
        wi += [195] + u_ids + [196] + a_ids
        wl += [eos] + [-100] * len(u_ids) + [-100] + a_ids
    assert ids == [[wi + [eos]]] and labels == [[wl + [eos]]]
    with pytest.raises(PreprocessError, match="Baichuan's role ids 195 / 196"):
        _run(tmp_path / "x", "MOSSMultiTurnHandler", moss, tok="llama2")


def test_pretrain_handlers(tmp_path):
    sp = _sp()
    alp = [{"instruction": "Name a color.", "input": "", "output": "Blue."},
           {"instruction": "Add.", "input": "2 and 3", "output": "5"}]
    _run(tmp_path / "a", "AlpacaPretrainHandler", alp, append_eod=True)
    fmt = ("A chat between a curious user and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the user's questions."
           "USER: Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n\n### Instruction:\n{instruction}\n\n###{inputs}\n\n### Response: ASSISTANT: {response}")
    docs = _docs(tmp_path / "a" / "out_text_document")
    for r, d in zip(alp, docs):
        text = fmt.format(instruction=r["instruction"], inputs=f" Input:\n{r['input']}" if r["input"] else None,
                          response=r["output"])
        assert d == [[1] + sp.encode(text) + [2]]
    assert "###None" in load_tokenizer(shared_data() / "tokenizers" / "llama2").decode(docs[0][0])

    so = [{"title": "How to sort?", "question_body": "I have a list.", "answer_body": "Use sorted()."}]
    _run(tmp_path / "s", "StackOverflowPythonPretrainHandler", so)
    text = "In python, How to sort?\n### Question:\nI have a list.\n### Response:\nUse sorted().\n"
    assert _docs(tmp_path / "s" / "out_text_document") == [[[1] + sp.encode(text)]]


def test_handler_rejects_are_counted(tmp_path):
    recs = [{"instruction": "ok", "input": "", "output": "fine"}, {"instruction": "no output"},
            {"instruction": 3, "output": "x"}, {"instruction": "q", "output": "   "}]
    _, rep = _run(tmp_path, "GeneralInstructionHandler", recs, seq_length=100)
    assert rep.written == 1 and dict(rep.rejected) == {"missing_key": 1, "wrong_type": 1, "empty_text": 1}
    _, rep = _run(tmp_path / "t", "GeneralInstructionHandler", recs[:1], seq_length=10)
    assert dict(rep.rejected) == {"too_long": 1}


@pytest.mark.parametrize("kw, msg", [
    (dict(handler="GeneralInstructionHandler", prompt_type="chatml"),
     r"PreprocessConfig\.prompt_type apply to AlpacaStyleInstructionHandler"),
    (dict(handler="MOSSMultiTurnHandler", append_eod=True), r"PreprocessConfig\.append_eod: MOSSMultiTurnHandler"),
    (dict(handler="GeneralInstructionHandler", pack=True, seq_length=8), r"PreprocessConfig\.pack needs"),
    (dict(handler="AlpacaPretrainHandler", json_keys=("body",)), r"builds its own 'text'"),
    (dict(handler="AlpacaStyleInstructionHandler", bos="never"), r"PreprocessConfig\.bos applies to"),
    (dict(subset_index=1), r"PreprocessConfig\.subset_index 1 needs PreprocessConfig\.n_subs"),
    (dict(n_subs=2, subset_index=2), r"0 <= index < n_subs"),
])
def test_config_refusals(tmp_path, kw, msg):
    with pytest.raises(PreprocessError, match=msg):
        PreprocessConfig(inputs=("x.jsonl",), output_prefix=str(tmp_path / "o"), tokenizer="bytes", **kw)


def _script():
    spec = importlib.util.spec_from_file_location("preprocess_data_script", ROOT / "scripts" / "preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_refused_modellink_flags_name_the_reason(tmp_path, capsys):
    main = _script()
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hello"}\n', encoding="utf-8")
    base = ["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "ByteTokenizer",
            "--no-progress"]
    for extra, msg in ((["--split-sentences"], "--split-sentences is not supported: ModelLink splits sentences "
                                              "with NLTK's punkt"),
                       (["--keep-newlines"], "--keep-newlines is not supported"),
                       (["--cache-dir", str(tmp_path)], "--cache-dir is not supported: pmodel streams its inputs"),
                       (["--overwrite-cache"], "--overwrite-cache is not supported"),
                       (["--tokenizer-not-use-fast"], "--tokenizer-not-use-fast: ByteTokenizer has no fast"),
                       (["--subset-index", "0"], "--subset-index 0 needs --n-subs")):
        assert main(base + extra) != 0, extra
        assert msg in capsys.readouterr().err, extra


def test_tokenizer_not_use_fast_picks_the_slow_file(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "tok"
    folder.mkdir()
    model = shared_data() / "tokenizers" / "llama2" / "tokenizer.model"
    (folder / "tokenizer.model").write_bytes(model.read_bytes())
    from tokenizers import Tokenizer as HFTok

    try:
        conv = transformers.LlamaTokenizerFast(vocab_file=str(model))
    except Exception as e:  # conversion needs protobuf / sentencepiece
        pytest.skip(f"cannot build a tokenizer.json here: {e}")
    conv.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").exists() and HFTok.from_file(str(folder / "tokenizer.json"))
    assert isinstance(load_tokenizer(folder), HFTokenizer)
    slow = load_tokenizer(folder, use_fast=False)
    assert isinstance(slow, SentencePieceTokenizer) and slow.encode("Hello world") == [15043, 3186]
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no slow-tokenizer file"):
        load_tokenizer(folder, use_fast=False)
    with pytest.raises(ValueError, match="tokenizer.json is the fast one"):
        load_tokenizer(folder / "tokenizer.json", use_fast=False)


def _example_command(name: str) -> list[str]:
    text = (shared_data() / "modellink_examples" / "llama2" / name).read_text(encoding="utf-8")
    cmd = re.search(r"python (\./preprocess_data\.py.*?)(?:\n\s*\n|$)", text.replace("\\\n", " "), re.S).group(1)
    return shlex.split(cmd)[1:]


def test_modellink_data_convert_example_runs_unchanged_but_for_paths(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    data = shared_data()
    args = _example_command("data_convert_llama2_pretrain.sh")
    # the enwiki parquet's columns (id, url, title, text), filled from the wiki demo text
    paras = [p for p in (data / "pretrain" / "wiki_demo.txt").read_text(encoding="utf-8").split("\n") if p.strip()]
    rows = [{"id": str(i), "url": f"https://en.wikipedia.org/wiki?curid={i}", "title": f"t{i}", "text": p}
            for i, p in enumerate(paras)]
    paths = {"./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet": str(tmp_path / "train.parquet"),
             "./model_from_hf/Llama2-hf/": str(data / "tokenizers" / "llama2"),
             "./dataset/enwiki": str(tmp_path / "enwiki")}
    pq.write_table(pa.Table.from_pylist(rows), paths["./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet"],
                   row_group_size=16)
    assert "--workers" in args and "--log-interval" in args
    args = [paths.get(a, a) for a in args]
    assert _script()(args + ["--no-progress"]) == 0
    assert f"records read: {len(rows)}, written: {len(rows)}" in capsys.readouterr().out
    sp = _sp()
    docs = _docs(tmp_path / "enwiki_text_document")
    assert len(docs) == len(rows)
    assert all(d == [[1] + sp.encode(r["text"])] for d, r in zip(docs[:20], rows))
