"""scripts/finetune.py end to end on the stories260K base and ../shared/data/sft records."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

import pmodel
from pmodel import lora as L
from pmodel.checkpoint import peft as peft_io

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BASE = SHARED / "models" / "stories260K"
SFT = SHARED / "sft" / "llamafactory" / "alpaca_en_demo.json"


def _need_data():
    if not (BASE / "model.safetensors").exists() or not SFT.exists():
        pytest.skip("../shared/data (stories260K, sft/llamafactory) not present (fresh clone)")


def _script():
    spec = importlib.util.spec_from_file_location("finetune_cli", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _train_args(out, *extra):
    return ["--load-hf", BASE, "--data-path", SFT, "--prompt-type", "alpaca", "--seq-length", 256,
            "--max-samples", 40, "--micro-batch-size", 4, "--eval-samples", 12, "--save", out, *extra]


def test_cli_rejects_flags_it_would_ignore():
    ft = _script()
    base = ["--load-hf", "x", "--data-path", "d.json", "--save", "o", "--train-iters", "1"]
    with pytest.raises(SystemExit):
        ft.parse_args(base + ["--lora-alpha", "16"])  # LoRA flags without --lora-r
    with pytest.raises(SystemExit):
        ft.parse_args(base + ["--lora-load", "a", "--lora-r", "8"])  # the adapter fixes the rank
    with pytest.raises(SystemExit):
        ft.parse_args(["--load-hf", "x", "--data-path", "prefix", "--save", "o", "--train-iters", "1",
                       "--prompt-type", "alpaca"])  # templates apply to raw records only
    a = ft.parse_args(base + ["--lora-r", "8", "--lora-target-modules", "query_key_value", "dense"])
    assert a.command == "train" and a.lora_target_modules == ["query_key_value", "dense"]
    assert ft.parse_args(["merge", "--load-hf", "b", "--lora-load", "a", "--save", "o"]).command == "merge"


@pytest.mark.slow
def test_lora_finetune_merge_and_full_sft(tmp_path):
    _need_data()
    adapter = tmp_path / "adapter"
    log = _run(*_train_args(adapter, "--train-iters", 12, "--lr", 5e-3, "--lora-r", 8, "--lora-alpha", 16,
                            "--lora-target-modules", "all", "--lora-dropout", 0.05))
    info = next(x for x in log if "model" in x)
    before = next(x["loss"] for x in log if x.get("eval") == "before")
    after = next(x["loss"] for x in log if x.get("eval") == "after")
    # r * (in + out) per module: q, o 64x64; k, v 32x64; gate, up, down 172x64; five layers
    assert info["lora"] and info["trainable_params"] == 5 * 8 * (2 * 128 + 2 * 96 + 3 * 236)
    assert after < before - 0.3, (before, after)  # response-token loss falls
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert not (adapter / "model.safetensors").exists()  # adapter-only checkpoint

    # the adapter changed only the factors: base weights untouched, merged = adapter outputs
    model, params = pmodel.load_hf(BASE)
    lm, lp = peft_io.load_adapter(model, params, adapter)
    assert L.spec_of(lm).dropout == 0.05 and len(L.spec_of(lm).modules) == 5 * 7
    merged_dir = tmp_path / "merged"
    _run("merge", "--load-hf", BASE, "--lora-load", adapter, "--save", merged_dir)
    assert (merged_dir / "tokenizer.model").exists()
    # Compared in float64: the trained logits reach ~16, where two fp32 evaluation orders
    # (merged vs separate low-rank path) each sit ~1.3e-5 from the float64 result. In float64
    # the only difference left is the fp32 rounding of the saved merged weights.
    mm, mp = pmodel.load_hf(merged_dir, dtype=torch.float64)
    m64, p64 = pmodel.load_hf(BASE, dtype=torch.float64)
    lm64, lp64 = peft_io.load_adapter(m64, p64, adapter)
    toks = torch.randint(3, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = mm.apply(mp, toks)
        ref = lm64.apply(L.bind_dropout(lp64, train=False), toks)
        base = m64.apply(p64, toks)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-2

    # resume from the adapter: continues from the saved factors
    log2 = _run(*_train_args(tmp_path / "adapter2", "--train-iters", 2, "--lr", 1e-3, "--lora-load", adapter))
    assert abs(next(x["loss"] for x in log2 if x.get("eval") == "before") - after) < 1e-5

    # full-parameter SFT: a plain HF checkpoint, response-token loss falls
    full = tmp_path / "full"
    log3 = _run(*_train_args(full, "--train-iters", 6, "--lr", 2e-3))
    b3 = next(x["loss"] for x in log3 if x.get("eval") == "before")
    a3 = next(x["loss"] for x in log3 if x.get("eval") == "after")
    assert next(x for x in log3 if "model" in x)["trainable_params"] == next(
        x for x in log3 if "model" in x)["total_params"]
    assert a3 < b3 - 0.1, (b3, a3)
    assert abs(b3 - before) < 1e-5  # same base, same eval set
    fm, fp = pmodel.load_hf(full)
    assert (full / "tokenizer.model").exists()
    assert any(not torch.equal(a, b) for a, b in zip(pmodel.tree.leaves(fp), pmodel.tree.leaves(params)))


def test_cli_refuses_more_ignored_flags_and_bad_values(tmp_path):
    ft = _script()
    base = ["--load-hf", "x", "--data-path", "d.json", "--save", "o", "--train-iters", "1"]
    prefix = ["--load-hf", "x", "--data-path", "prefix", "--save", "o", "--train-iters", "1"]
    for argv in (prefix + ["--tokenizer", "tok.model"],      # raw records only
                 prefix + ["--data-style", "sharegpt"],      # raw records only
                 base + ["--map-keys", "{not json"],
                 base + ["--map-keys", '["a"]'],
                 base + ["--max-samples", "0"],
                 base + ["--eval-samples", "-1"],
                 base + ["--clip-grad", "-1"],
                 base + ["--lr-decay-style", "constant", "--min-lr", "1e-5"]):
        with pytest.raises(SystemExit):
            ft.parse_args(argv)
    assert ft.parse_args(base + ["--data-style", "sharegpt"]).data_style == "sharegpt"


def test_seq_length_bounds_preprocessed_examples(tmp_path):
    from pmodel.data import PreprocessConfig, preprocess
    ft = _script()
    src = tmp_path / "a.json"
    src.write_text(json.dumps([{"instruction": "q" * n, "output": "a" * n} for n in (3, 40)]), encoding="utf-8")
    rep = preprocess(PreprocessConfig(inputs=(str(src),), output_prefix=str(tmp_path / "ds"), tokenizer="bytes",
                                      handler="AlpacaStyleInstructionHandler", progress=False))
    ds = pmodel.data.InstructionDataset(tmp_path / "ds")
    longest = max(len(ds[i]["tokens"]) for i in range(len(ds)))
    assert rep.written == 2 and longest >= 80
    args = ft.parse_args(["--load-hf", "x", "--data-path", str(tmp_path / "ds"), "--save", "o",
                          "--train-iters", "1", "--seq-length", str(longest - 1)])
    with pytest.raises(SystemExit, match=rf"example 1 has {longest} training positions, more than --seq-length"):
        ft.load_examples(args, None)
    args.seq_length = longest
    got, info = ft.load_examples(args, None)
    assert info == {"source": "preprocessed", "examples": 2} and len(got) == 2


def test_diverging_lora_finetune_stops_with_an_error_and_saves_no_adapter(tmp_path):
    _need_data()
    ft = _script()
    out = tmp_path / "adapter"
    args = ["train", *map(str, _train_args(out, "--train-iters", 30, "--lr", 1e6, "--clip-grad", 0,
                                           "--lora-r", 4, "--max-nonfinite-steps", 2, "--eval-samples", 0,
                                           "--max-samples", 40, "--micro-batch-size", 2))]
    with pytest.raises(SystemExit, match="non-finite for 2 consecutive steps"):
        ft.main(args)
    assert not (out / "adapter_model.safetensors").exists()


def test_merge_refuses_to_overwrite_its_input_and_writes_atomically(tmp_path, monkeypatch):
    ft = _script()
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    for save in (base, base / "merged", adapter):
        with pytest.raises(SystemExit, match="would overwrite its own input"):
            ft.main(["merge", "--load-hf", str(base), "--lora-load", str(adapter), "--save", str(save)])
    _need_data()
    model, params = pmodel.load_hf(BASE)
    lm = L.lora(model, 4, 8.0, 0.0, "all")
    peft_io.save_adapter(lm, L.adapt(lm, params, seed=0), adapter)
    out = tmp_path / "merged"

    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(ft, "_copy_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        ft.main(["merge", "--load-hf", str(BASE), "--lora-load", str(adapter), "--save", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # nothing half-written


def test_every_label_masked_is_refused(tmp_path):
    _need_data()
    from pmodel.data import write_indexed_dataset
    ft = _script()
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 500, 20).tolist() for _ in range(8)]
    write_indexed_dataset(tmp_path / "sft_packed_input_ids_document", docs)
    write_indexed_dataset(tmp_path / "sft_packed_labels_document", [[-100] * len(d) for d in docs])
    with pytest.raises(SystemExit, match="no tokens to train on: every label of the 8 examples is masked"):
        ft.main(["train", "--load-hf", str(BASE), "--data-path", str(tmp_path / "sft"), "--seq-length", "64",
                 "--micro-batch-size", "2", "--train-iters", "2", "--save", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_non_utf8_records_and_truncated_weights_name_the_file(tmp_path):
    _need_data()
    import shutil
    ft = _script()
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"instruction": "ok", "output": "x"},\n {"instruction": "\xff", "output": "y"}]')
    with pytest.raises(SystemExit, match=r"bad.json:2: not UTF-8 text \(byte 0xff"):
        ft.main(["train", "--load-hf", str(BASE), "--data-path", str(bad), "--prompt-type", "alpaca",
                 "--train-iters", "1", "--save", str(tmp_path / "o")])
    hf = tmp_path / "hf"
    shutil.copytree(BASE, hf)
    w = hf / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: cannot (be )?read"):
        pmodel.load_hf(hf)
    model, params = pmodel.load_hf(BASE)
    lm = L.lora(model, 4, 8.0, 0.0, "all")
    peft_io.save_adapter(lm, L.adapt(lm, params, seed=0), tmp_path / "ad")
    a = tmp_path / "ad" / "adapter_model.safetensors"
    a.write_bytes(a.read_bytes()[: a.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: cannot (be )?read"):
        peft_io.load_adapter(model, params, tmp_path / "ad")


def test_skipped_records_are_written_to_a_rejects_file_with_their_location(tmp_path):
    _need_data()
    ft = _script()
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="3 examples cannot fill one global batch of 4"):
        ft.main(["train", *map(str, _train_args(out, "--train-iters", 1, "--max-samples", 8))])
    recs = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(recs) == 5 and {r["reason"] for r in recs} == {"too_long"}
    assert all(r["file"] == str(SFT) and 1 <= r["record"] <= 8 for r in recs)
