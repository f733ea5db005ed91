"""scripts/convert_ckpt.py: HF <-> the sharded training checkpoint at any TP / PP, training
checkpoint -> another layout with its optimizer state, LoRA merge in fp32, ModelLink's LLaMA-2
conversion scripts run with only the entry point and paths changed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pmodel
from pmodel import lora as L
from pmodel import tree
from pmodel.checkpoint import peft, sharded

ROOT = Path(__file__).resolve().parents[1]
CONVERT = ROOT / "scripts" / "convert_ckpt.py"
PRETRAIN = ROOT / "scripts" / "pretrain.py"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLES = SHARED / "modellink_examples" / "llama2"
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")},
       "OMP_NUM_THREADS": "1"}
TRAIN = ["--mock-data", "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3",
         "--log-interval", "1", "--no-progress"]


def _run(script, *args, ok=True, cwd=ROOT):
    p = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                       text=True, timeout=300)
    if ok:
        assert p.returncode == 0, f"{args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _convert(*args, ok=True):
    p = _run(CONVERT, "--model-type", "GPT", *args, ok=ok)
    return json.loads(p.stdout.strip().splitlines()[-1]) if ok else p


def _hf(tmp_path, name="hf", **over):
    """A tiny untied Llama as an HF folder (4 layers so that PP2 and PP4 split it)."""
    model = pmodel.families.preset("debug", num_layers=4, **over)
    params = pmodel.init(model, seed=3)
    d = pmodel.save_hf(model, params, tmp_path / name)
    return model, params, d


def _metrics(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if '"loss"' in x and "eval_loss" not in x]


def test_hf_to_tp2_pp2_to_hf_is_bitwise_and_each_rank_file_holds_its_shards(tmp_path):
    model, params, hf = _hf(tmp_path)
    rep = _convert("--loader", "llama2_hf", "--saver", "megatron", "--target-tensor-parallel-size", "2",
                   "--target-pipeline-parallel-size", "2", "--load-dir", hf, "--save-dir", tmp_path / "mg")
    assert rep["ranks"] == 4 and rep["optimizer_state"] is False
    d = tmp_path / "mg" / "iter_0000000"
    man = json.loads((d / "manifest.json").read_text())
    assert man["mesh"]["tp"] == 2 and man["mesh"]["pp"] == 2 and man["extra"]["family"] == "llama"
    full = dict(tree.paths(params))
    for r in range(4):
        idx = json.loads((d / f"rank_{r:05d}.json").read_text())["pieces"]
        tensors = load_file(d / f"rank_{r:05d}.safetensors")
        layers = {int(e["param"].split(".")[1]) for e in idx if e["param"].startswith("layers.")}
        assert layers == ({0, 1} if r < 2 else {2, 3}), (r, layers)  # rank = tp + 2 * pp
        assert any(e["param"] == "embed.weight" for e in idx) == (r < 2)
        assert any(e["param"] == "lm_head.weight" for e in idx) == (r >= 2)
        for e in idx:
            want = full[e["param"]][tuple(slice(a, b) for a, b in e["slice"])]
            assert torch.equal(tensors[e["name"]], want), (r, e["name"])
        q = [e for e in idx if e["param"] == f"layers.{0 if r < 2 else 2}.attn.q_proj.weight"][0]
        assert q["slice"] == [[32 * (r % 2), 32 * (r % 2) + 32], [0, 64]]
    rep = _convert("--loader", "megatron", "--saver", "megatron", "--save-model-type", "save_huggingface_llama",
                   "--load-dir", tmp_path / "mg", "--save-dir", tmp_path / "back")
    assert rep["saver"] == "hf"
    a, b = load_file(hf / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((hf / "config.json").read_text()) == json.loads((tmp_path / "back" / "config.json").read_text())


def test_hf_converted_checkpoint_trains_like_load_hf_and_flags_are_checked(tmp_path):
    _, _, hf = _hf(tmp_path)
    _convert("--loader", "hf", "--saver", "megatron", "--target-tensor-parallel-size", "2",
             "--target-pipeline-parallel-size", "2", "--load-dir", hf, "--save-dir", tmp_path / "mg")
    _run(PRETRAIN, "--load-hf", hf, *TRAIN, "--train-iters", "3", "--metrics-file", tmp_path / "a.jsonl")
    # Loaded on one process from the TP2 x PP2 files (resharded), parameters only.
    out = _run(PRETRAIN, "--hf-config", hf, "--load", tmp_path / "mg", "--no-load-optim", *TRAIN, "--train-iters",
               "3", "--metrics-file", tmp_path / "b.jsonl").stdout
    assert "parameters only" in out, out
    key = lambda r: (r["step"], r["loss"], r["grad_norm"], r["lr"])  # noqa: E731
    assert [key(r) for r in _metrics(tmp_path / "b.jsonl")] == [key(r) for r in _metrics(tmp_path / "a.jsonl")]
    # Without --no-load-optim the missing optimizer state is refused, naming the flag.
    p = _run(PRETRAIN, "--hf-config", hf, "--load", tmp_path / "mg", *TRAIN, "--train-iters", "3", ok=False)
    assert p.returncode != 0 and "--no-load-optim" in p.stderr, p.stderr
    p = _run(PRETRAIN, "--model", "debug", "--no-load-optim", *TRAIN, "--train-iters", "1", ok=False)
    assert "--no-load-optim" in p.stderr and "needs --load" in p.stderr, p.stderr
    # Refusals name the flag.
    for args, words in (
            (["--loader", "hf", "--saver", "hf", "--target-tensor-parallel-size", "2"], "not sharded"),
            (["--loader", "hf", "--saver", "megatron", "--num-layer-list", "2,2"], "--target-pipeline-parallel-size"),
            (["--loader", "hf", "--saver", "megatron", "--lora-r", "4"], "need --lora-load"),
            (["--loader", "hf", "--saver", "megatron", "--target-tensor-parallel-size", "3"], "--target-tensor"),
            (["--loader", "bloom_ds", "--saver", "megatron"], "--loader bloom_ds"),
            (["--loader", "hf", "--saver", "megatron", "--save-model-type", "save_huggingface_qwen2"],
             "--save-model-type save_huggingface_qwen2")):
        p = _convert(*args, "--load-dir", hf, "--save-dir", tmp_path / "x", ok=False)
        assert p.returncode != 0 and words in p.stderr, (args, p.stderr)
    p = _run(CONVERT, "--model-type", "BERT", "--load-dir", hf, "--save-dir", tmp_path / "x", ok=False)
    assert "--model-type BERT" in p.stderr


def _adapter(tmp_path, model, params, dtype):
    lm = L.lora(model, 4, 8.0, 0.0, ["q_proj", "v_proj", "down_proj"])
    lp = L.adapt(lm, params, seed=1)
    g = torch.Generator().manual_seed(0)
    lp = tree.map(lambda n: n.replace(b=(torch.randn(n.b.shape, generator=g) * 0.3).to(dtype)) if L.is_lora(n)
                  else n, lp, is_leaf=L.is_lora)
    peft.save_adapter(lm, lp, tmp_path / "adapter")
    return lm, lp


def test_lora_merge_is_fp32_and_equals_the_adapted_model(tmp_path):
    model, params, hf = _hf(tmp_path)
    lm, lp = _adapter(tmp_path, model, params, torch.float32)
    rep = _convert("--loader", "hf", "--saver", "hf", "--load-dir", hf, "--lora-load", tmp_path / "adapter",
                   "--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "q_proj", "v_proj", "down_proj",
                   "--save-dir", tmp_path / "merged")
    assert rep["lora_merged_modules"] == 4 * 3
    mm, mp = pmodel.load_hf(tmp_path / "merged")
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = lm.apply(L.bind_dropout(lp, train=False), tokens)
        got = mm.apply(mp, tokens)
    # x W^T + s (x A^T) B^T vs x (W + s B A)^T: equal up to fp32 summation order
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), float((got - want).abs().max())
    for (k, a), (_, b) in zip(tree.paths(L.merge(lp)), tree.paths(mp)):
        assert torch.equal(a, b), k
    # Through the training format too (HF + adapter -> TP2 files -> HF), and a mismatched --lora-r
    _convert("--loader", "hf", "--saver", "megatron", "--target-tensor-parallel-size", "2", "--load-dir", hf,
             "--lora-load", tmp_path / "adapter", "--save-dir", tmp_path / "mg")
    _convert("--loader", "megatron", "--saver", "hf", "--load-dir", tmp_path / "mg", "--save-dir", tmp_path / "m2")
    a, b = load_file(tmp_path / "merged" / "model.safetensors"), load_file(tmp_path / "m2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    p = _convert("--loader", "hf", "--saver", "hf", "--load-dir", hf, "--lora-load", tmp_path / "adapter",
                 "--lora-r", "8", "--save-dir", tmp_path / "x", ok=False)
    assert "--lora-r 8" in p.stderr and "rank 4" in p.stderr


def test_lora_merge_of_fp16_weights_is_computed_in_fp32_then_cast(tmp_path):
    model, params, hf = _hf(tmp_path, dtype=torch.float16)
    lm, lp = _adapter(tmp_path, model, params, torch.float16)
    _convert("--loader", "hf", "--saver", "hf", "--load-dir", hf, "--lora-load", tmp_path / "adapter",
             "--save-dir", tmp_path / "merged")
    got = dict(tree.paths(pmodel.load_hf(tmp_path / "merged")[1]))
    differs = 0
    for path, n in tree.paths(lp, is_leaf=L.is_lora):
        if not L.is_lora(n):
            continue
        w, a, b = n.base, n.a, n.b
        fp32 = (w.float() + n.scale * (b.float() @ a.float())).half()
        fp16 = w + (n.scale * (b @ a)).half()  # what an fp16 merge would give
        assert got[path].dtype == torch.float16 and torch.equal(got[path], fp32), path
        differs += int(not torch.equal(fp16, fp32))
    assert differs > 0  # the test can tell the two apart
    # --params-dtype casts after the fp32 merge
    _convert("--loader", "hf", "--saver", "hf", "--load-dir", hf, "--lora-load", tmp_path / "adapter",
             "--params-dtype", "bf16", "--save-dir", tmp_path / "bf16")
    got = dict(tree.paths(pmodel.load_hf(tmp_path / "bf16")[1]))
    for path, n in tree.paths(lp, is_leaf=L.is_lora):
        if L.is_lora(n):
            want = (n.base.float() + n.scale * (n.b.float() @ n.a.float())).bfloat16()
            assert torch.equal(got[path], want), path


def _modellink(script: Path, tmp: Path) -> Path:
    """ModelLink's script with only the entry point changed (and the Ascend env line dropped)."""
    text = script.read_text()
    text = text.replace("source /usr/local/Ascend/ascend-toolkit/set_env.sh", "")
    assert "python tools/checkpoint/convert_ckpt.py" in text
    text = text.replace("python tools/checkpoint/convert_ckpt.py", f"{sys.executable} {CONVERT}")
    out = tmp / script.name
    out.write_text(text)
    return out


def test_modellink_llama2_conversion_scripts_run(tmp_path):
    if not (EXAMPLES / "ckpt_convert_llama2_hf2legacy.sh").exists():
        pytest.skip("../shared/data/modellink_examples not present (fresh clone)")
    tok = SHARED / "models" / "stories260K" / "tokenizer.model"
    if not tok.exists():
        pytest.skip("../shared/data/models/stories260K not present (fresh clone)")
    # The scripts' own relative paths, under a scratch working directory; a 4-layer model (the
    # hf2legacy script's PP2 needs an even layer count) with a 512-piece tokenizer.
    work = tmp_path / "work"
    _, _, hf = _hf(work / "model_from_hf", name="Llama2-hf")
    (hf / "tokenizer.model").write_bytes(tok.read_bytes())
    for name in ("ckpt_convert_llama2_hf2legacy.sh",):
        p = subprocess.run(["bash", str(_modellink(EXAMPLES / name, tmp_path))], cwd=work, env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    legacy = work / "model_weights" / "Llama2-legacy"
    man = json.loads((legacy / "iter_0000000" / "manifest.json").read_text())
    assert man["mesh"]["pp"] == 2 and man["mesh"]["tp"] == 1 and man["world_size"] == 2
    # legacy2hf names the original HF folder (Llama2-70b-hf there): output goes to its mg2hg/.
    (work / "model_from_hf" / "Llama2-70b-hf").mkdir()
    for f in hf.iterdir():
        (work / "model_from_hf" / "Llama2-70b-hf" / f.name).write_bytes(f.read_bytes())
    p = subprocess.run(["bash", str(_modellink(EXAMPLES / "ckpt_convert_llama2_legacy2hf.sh", tmp_path))], cwd=work,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = work / "model_from_hf" / "Llama2-70b-hf" / "mg2hg"
    a, b = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2_pp2_training_checkpoint_converted_to_pp4_trains_on(tmp_path):
    """One process trains 8 steps (the reference) and saves at 3; that checkpoint, converted to
    TP2 x PP2 (optimizer state kept), resumes on 4 ranks to step 5 and saves; that TP2 x PP2
    checkpoint, converted to TP1 x PP4, resumes on 4 ranks to step 8. Every loss and grad norm
    equals the uninterrupted single-process run within 1e-5 relative."""
    from test_layouts_cli import COMMON, _close, _ranks, _single
    COMMON = [*COMMON, "--lr-decay-iters", "8"]  # the same schedule whatever --train-iters stops the run
    ref = tmp_path / "ref.jsonl"
    _single(PRETRAIN, [*COMMON, "--train-iters", "8", "--save", tmp_path / "one", "--save-interval", "3",
                       "--metrics-file", ref])
    (tmp_path / "one" / "latest").write_text("iter_0000003\n")
    rep = _convert("--loader", "megatron", "--saver", "megatron", "--target-tensor-parallel-size", "2",
                   "--target-pipeline-parallel-size", "2", "--load-dir", tmp_path / "one", "--save-dir",
                   tmp_path / "tp2pp2_in")
    assert rep["optimizer_state"] and rep["step"] == 3
    m1 = tmp_path / "tp2pp2.jsonl"
    out = _ranks(PRETRAIN, [*COMMON, "--train-iters", "5", "--tensor-model-parallel-size", "2",
                            "--pipeline-model-parallel-size", "2", "--load", tmp_path / "tp2pp2_in", "--save",
                            tmp_path / "tp2pp2", "--metrics-file", m1], 4)
    assert "at iteration 3 (12 samples consumed)" in out, out
    _close(_metrics(m1), _metrics(ref)[3:5], "TP2xPP2 resumed from a converted single-process checkpoint")
    rep = _convert("--loader", "megatron", "--saver", "megatron", "--target-pipeline-parallel-size", "4",
                   "--load-dir", tmp_path / "tp2pp2", "--save-dir", tmp_path / "pp4")
    assert rep["optimizer_state"] and rep["step"] == 5 and rep["ranks"] == 4
    m2 = tmp_path / "pp4.jsonl"
    _ranks(PRETRAIN, [*COMMON, "--train-iters", "8", "--pipeline-model-parallel-size", "4", "--load",
                      tmp_path / "pp4", "--metrics-file", m2], 4)
    _close(_metrics(m2), _metrics(ref)[5:], "TP2xPP2 checkpoint converted to PP4")
