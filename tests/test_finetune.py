"""scripts/finetune.py end to end on the stories260K base and ../shared/data/sft records."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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
