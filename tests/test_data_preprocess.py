"""preprocess_data: bad-record report, worker ordering, pretraining and instruction outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pmodel.data import (IGNORE_INDEX, IndexedDataset, InstructionDataset, PreprocessConfig, PreprocessError,
                         load_tokenizer, preprocess)
from tests._data_helpers import shared_data

ROOT = Path(__file__).resolve().parents[1]


def _bad_jsonl(path: Path) -> None:
    lines = [
        b'{"text": "first good document"}',        # 1 ok
        b'{"text": "broken json"',                 # 2 invalid_json
        b'{"other": "no text key"}',               # 3 missing_key
        b'{"text": 42}',                           # 4 wrong_type
        b'{"text": "bad utf8 \xff\xfe here"}',     # 5 invalid_utf8
        b'{"text": "   "}',                        # 6 empty_text
        b'',                                       # 7 empty_line
        b'["not", "an", "object"]',                # 8 wrong_type
        b'{"text": "last good document"}',         # 9 ok
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")


def _cfg(tmp_path, inputs, **kw):
    return PreprocessConfig(inputs=tuple(str(i) for i in inputs), output_prefix=str(tmp_path / "out" / "ds"),
                            tokenizer="bytes", progress=False, **kw)


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_input_report(tmp_path, workers):
    src = tmp_path / "bad.jsonl"
    _bad_jsonl(src)
    rep = preprocess(_cfg(tmp_path, [src], workers=workers, chunk_size=2, append_eod=True))
    assert rep.records == 9 and rep.written == 2 and rep.num_rejected == 7
    assert dict(rep.rejected) == {"invalid_json": 1, "missing_key": 1, "wrong_type": 2, "invalid_utf8": 1,
                                  "empty_text": 1, "empty_line": 1}
    rejects = [json.loads(l) for l in Path(rep.rejects_path).read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [
        (2, "invalid_json"), (3, "missing_key"), (4, "wrong_type"), (5, "invalid_utf8"), (6, "empty_text"),
        (7, "empty_line"), (8, "wrong_type")]
    assert all(r["file"] == str(src) for r in rejects)
    assert "'text'" in rejects[1]["message"] and "expected" in rejects[2]["message"]
    assert f"{src}:2: invalid_json" in rep.summary()
    ds = IndexedDataset(tmp_path / "out" / "ds_text_document")
    tok = load_tokenizer("bytes")
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["first good document</s>", "last good document</s>"]
    with pytest.raises(PreprocessError, match=r"bad.jsonl:2: invalid_json"):
        preprocess(_cfg(tmp_path, [src], strict=True))


def test_workers_keep_order_and_bytes(tmp_path):
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i} " * (i % 7 + 1)}) + "\n" for i in range(500)))
    a = preprocess(_cfg(tmp_path / "a", [src], workers=1))
    b = preprocess(_cfg(tmp_path / "b", [src], workers=3, chunk_size=7))
    assert a.written == b.written == 500 and a.tokens == b.tokens
    for suffix in (".bin", ".idx"):
        assert Path(a.outputs[0] + suffix).read_bytes() == Path(b.outputs[0] + suffix).read_bytes()


def test_json_txt_and_directory_inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("line one\n\n  \nline two\n", encoding="utf-8")
    (d / "b.json").write_text(json.dumps([{"text": "x1"}, {"text": ""}, {"text": "x3"}]), encoding="utf-8")
    (d / "c.json").write_text('[{"text": "oops"', encoding="utf-8")
    rep = preprocess(_cfg(tmp_path, [d]))
    assert rep.blank_lines == 2 and rep.written == 4
    assert dict(rep.rejected) == {"empty_text": 1, "invalid_json": 1}
    assert any("b.json:2: empty_text" in e for e in rep.examples)


def test_instruction_handler_pack_and_seq_length(tmp_path):
    recs = [{"instruction": f"q{i}" * (i + 1), "output": f"a{i}" * (i + 1)} for i in range(12)]
    recs.append({"instruction": "long" * 100, "output": "x"})    # too long for seq_length
    recs.append({"instruction": "no output"})                    # missing_key
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps(recs), encoding="utf-8")
    common = dict(handler="AlpacaStyleInstructionHandler", prompt_type="chatml", seq_length=256)
    plain = preprocess(_cfg(tmp_path / "p", [src], **common))
    packed = preprocess(_cfg(tmp_path / "k", [src], pack=True, **common))
    assert plain.written == packed.written == 12
    assert dict(plain.rejected) == {"too_long": 1, "missing_key": 1}
    assert packed.documents < plain.documents == 12
    a, b = InstructionDataset(tmp_path / "p" / "out" / "ds"), InstructionDataset(tmp_path / "k" / "out" / "ds")
    assert len(b) == packed.documents
    singles = {tuple(a[i]["tokens"].tolist()): a[i] for i in range(len(a))}
    n = 0
    for j in range(len(b)):
        e = b[j]
        assert len(e["tokens"]) <= 256 and e["seq_lens"].sum() == len(e["tokens"])
        start = 0
        for L in e["seq_lens"]:
            part = tuple(e["tokens"][start:start + L].tolist())
            assert part in singles
            np.testing.assert_array_equal(e["labels"][start:start + L], singles[part]["labels"])
            assert e["position_ids"][start] == 0
            start += L
            n += 1
    assert n == 12
    lab = a[0]["labels"]
    assert (lab == IGNORE_INDEX).any() and (lab != IGNORE_INDEX).any()


def _script_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_data_script", ROOT / "scripts" / "preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_script_cli_on_shared_data(tmp_path, capsys):
    data = shared_data()
    main = _script_main()
    out = tmp_path / "c4"
    cmd = ["--input", str(data / "pretrain" / "c4_demo.jsonl"), "--json-keys", "text", "--tokenizer-type", "PretrainedFromHF",
           "--tokenizer-name-or-path", str(data / "tokenizers" / "llama2"), "--output-prefix", str(out),
           "--append-eod", "--workers", "2", "--no-progress"]
    assert main(cmd) == 0
    assert "records read: 300, written: 300" in capsys.readouterr().out
    ds = IndexedDataset(str(out) + "_text_document")
    assert len(ds) == 300 and ds.dtype == np.uint16 and all(int(ds[i][-1]) == 2 for i in range(300))
    sft = tmp_path / "sg"
    cmd = ["--input", str(data / "sft" / "sharegpt" / "dummy_conversation.json"), "--handler-name",
           "SharegptStyleInstructionHandler", "--prompt-type", "llama2", "--tokenizer-model",
           str(data / "tokenizers" / "llama2" / "tokenizer.model"), "--output-prefix", str(sft),
           "--seq-length", "512", "--pack", "--no-progress"]
    assert main(cmd) == 0
    ds = InstructionDataset(sft)
    assert len(ds) > 0 and all(len(ds[i]["tokens"]) <= 512 for i in range(len(ds)))


@pytest.mark.parametrize("kw, msg", [
    (dict(seq_length=128), r"PreprocessConfig\.seq_length apply to the instruction handlers only"),
    (dict(prompt_type="chatml"), r"PreprocessConfig\.prompt_type apply to the instruction handlers only"),
    (dict(map_keys={"text": "body"}), r"PreprocessConfig\.map_keys apply to the instruction handlers only"),
    (dict(handler="AlpacaStyleInstructionHandler", append_eod=True),
     r"PreprocessConfig\.append_eod applies to GeneralPretrainHandler"),
])
def test_config_refuses_options_the_handler_would_ignore(tmp_path, kw, msg):
    with pytest.raises(PreprocessError, match=msg):
        _cfg(tmp_path, [tmp_path / "x.jsonl"], **kw)


@pytest.mark.parametrize("kw, msg", [
    (dict(workers=0), "PreprocessConfig.workers must be >= 1, got 0"),
    (dict(chunk_size=0), "PreprocessConfig.chunk_size must be >= 1, got 0"),
    (dict(seq_length=0, handler="AlpacaStyleInstructionHandler"), "PreprocessConfig.seq_length must be >= 1, got 0"),
    (dict(pack=True, handler="AlpacaStyleInstructionHandler"),
     "PreprocessConfig.pack needs PreprocessConfig.seq_length and an instruction handler in PreprocessConfig.handler"),
    (dict(json_keys=()), "PreprocessConfig.json_keys is empty"),
    (dict(handler="Nope"), "PreprocessConfig.handler: unknown handler 'Nope'"),
])
def test_config_errors_name_the_config_fields(tmp_path, kw, msg):
    # the library speaks of its own arguments; only the script knows its flags
    with pytest.raises(PreprocessError) as e:
        _cfg(tmp_path, [tmp_path / "x.jsonl"], **kw)
    assert msg in str(e.value) and "--" not in str(e.value)


def test_script_refuses_flags_it_would_ignore(tmp_path, capsys):
    main = _script_main()
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hello"}\n', encoding="utf-8")
    base = ["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--no-progress"]
    cases = [
        (["--tokenizer-type", "ByteTokenizer", "--seq-length", "16"], "--seq-length apply to the instruction"),
        (["--tokenizer-type", "ByteTokenizer", "--tokenizer-model", str(src)], "ByteTokenizer reads no file"),
        (["--tokenizer-model", "a.model", "--tokenizer-name-or-path", "d"], "give one of --tokenizer-model"),
        (["--tokenizer-type", "ByteTokenizer", "--handler-name", "AlpacaStyleInstructionHandler",
          "--json-keys", "instruction"], "--json-keys applies to the pretraining handlers"),
        # library refusals come back in the script's own flags
        (["--tokenizer-type", "ByteTokenizer", "--workers", "0"], "error: --workers must be >= 1, got 0"),
        (["--tokenizer-type", "ByteTokenizer", "--handler-name", "AlpacaStyleInstructionHandler", "--pack"],
         "error: --pack needs --seq-length and an instruction handler in --handler-name"),
        (["--tokenizer-type", "ByteTokenizer", "--handler-name", "AlpacaStyleInstructionHandler", "--append-eod"],
         "--append-eod applies to GeneralPretrainHandler; AlpacaStyleInstructionHandler ends each response "
         "with the --prompt-type template's end token"),
    ]
    for extra, msg in cases:
        assert main(base + extra) != 0, extra
        assert msg in capsys.readouterr().err, extra
    assert not Path(str(tmp_path / "o") + "_text_document.bin").exists()
    # the default --json-keys (text) still applies when the flag is left out
    assert main(base + ["--tokenizer-type", "ByteTokenizer"]) == 0
    assert len(IndexedDataset(str(tmp_path / "o") + "_text_document")) == 1


def test_empty_or_all_rejected_input_and_unsupported_files_fail(tmp_path, capsys):
    main = _script_main()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n{"nope": 1}\n')
    for src, why in ((empty, "the input holds no records"), (bad, "all 2 records were rejected")):
        rc = main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "ByteTokenizer",
                   "--no-progress"])
        assert rc != 0
        assert f"error: nothing was written: {why}" in capsys.readouterr().err
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "hello"}\n')
    (d / "b.csv").write_text("text\nhello\n")
    (d / "c.jsonl.bz2").write_bytes(b"x")
    with pytest.raises(PreprocessError, match=r"2 file\(s\) of unsupported types in the directory: b.csv, c.jsonl.bz2"):
        preprocess(_cfg(tmp_path, [d]))
