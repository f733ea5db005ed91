"""scripts/generate.py: ModelLink's LLaMA-2 generate_*.sh scripts (LoRA ones included) run with
only the entry point, paths and sizes changed; their flags take effect (architecture checked
against the checkpoint, LoRA flags against the adapter) or are refused naming the reason; JSONL
batch mode equals the library; TP2 under torch.distributed.launch equals one process."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pmodel

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
SIZES = {"--num-layers": "2", "--hidden-size": "64", "--ffn-hidden-size": "112", "--num-attention-heads": "4",
         "--seq-length": "256", "--max-position-embeddings": "256", "--max-new-tokens": "12",
         "--num-query-groups": "2", "--vocab-size": "512", "--micro-batch-size": "2", "--global-batch-size": "4",
         "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1", "--lora-r": "4",
         "--lora-alpha": "8"}


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny untied LLaMA checkpoints with the stories260K tokenizer (MHA for 7B/13B, GQA for
    34B/70B) and a LoRA adapter for each, on every projection (ModelLink's target list)."""
    from conftest import SHARED_DATA
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present (fresh clone); this test needs the real test data")
    d = tmp_path_factory.mktemp("ml")
    out = {}
    for kind, kv in (("mha", 4), ("gqa", 2)):
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=256,
                                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(d / kind)
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(SHARED_DATA / "models" / "stories260K" / f, d / kind / f)
        model, params = pmodel.load_hf(d / kind)
        from pmodel import lora as L
        from pmodel.checkpoint import peft as peft_io
        lm = L.lora(model, rank=4, alpha=8, targets="all")
        lp = L.adapt(lm, params, seed=0)
        with torch.no_grad():
            for n in pmodel.tree.leaves(lp, is_leaf=L.is_lora):
                if L.is_lora(n):
                    n.b.normal_(0, 0.5)
        peft_io.save_adapter(lm, lp, d / f"{kind}_lora")
        out[kind] = d / kind
    return out


def _modellink_args(script: Path, ckpt: Path) -> list[str]:
    """The inference.py arguments of a ModelLink script, paths and sizes replaced."""
    text = script.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if " inference.py " in ln)
    args = shlex.split(line.split(" inference.py ", 1)[1].split("|")[0])
    subst = {"${CHECKPOINT}": str(ckpt), "${CHECKPOINT_LORA}": str(ckpt) + "_lora", "${TOKENIZER_PATH}": str(ckpt),
             "${TOKENIZER_MODEL}": str(ckpt / "tokenizer.model")}
    out = []
    for a in args:
        for k, v in subst.items():
            a = a.replace(k, v)
        out.append(a)
    for i, a in enumerate(out[:-1]):
        if a in SIZES and not out[i + 1].startswith("--"):
            out[i + 1] = SIZES[a]
    return out


SCRIPTS = sorted((Path(__file__).resolve().parents[2] / "shared" / "data" / "modellink_examples" / "llama2")
                 .glob("generate_*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_modellink_generate_scripts_run(ckpts, script):
    gqa = "--group-query-attention" in script.read_text()
    args = _modellink_args(script, ckpts["gqa" if gqa else "mha"])
    r = subprocess.run([sys.executable, "scripts/generate.py", *args], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for task in ("greedy", "do_sample", "beam_search"):
        assert f"=== {task}" in r.stdout and "how are you?" in r.stdout
    assert "--global-batch-size 4 has no effect" in r.stdout if "--global-batch-size" in args else True
    if "--lora-load" in args and "--inference-prompt-type" in args:
        assert "12 tokens" in r.stdout


def test_flags_are_checked_against_checkpoint_and_adapter(ckpts):
    base = [sys.executable, "scripts/generate.py", "--load", str(ckpts["mha"]), "--prompt", "Once"]
    cases = [
        (["--num-layers", "32"], "--num-layers 32 (checkpoint: 2)"),
        (["--group-query-attention", "--num-query-groups", "8"], "--num-query-groups 8 (checkpoint: 4)"),
        (["--lora-load", str(ckpts["mha"]) + "_lora", "--lora-r", "16"], "--lora-r 16 but the adapter"),
        (["--lora-load", str(ckpts["mha"]) + "_lora", "--lora-target-modules", "query_key_value"],
         "--lora-target-modules query_key_value name"),
        (["--pipeline-model-parallel-size", "2"], "pipeline-parallel inference is not supported"),
        (["--tensor-model-parallel-size", "2"], "launch with torchrun"),
        (["--sequence-parallel"], "--sequence-parallel cannot split"),
        (["--top-k", "5"], "give --temperature > 0"),
        (["--num-beams", "2", "--temperature", "0.5"], "beam search with sampling"),
        (["--seq-length", "3", "--max-new-tokens", "4", "--prompt", "Once upon a time there"],
         "the context holds 3 (max_length)"),
    ]
    for extra, msg in cases:
        r = subprocess.run(base + extra, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and msg in r.stderr, (extra, r.stderr[-2000:])


def test_jsonl_batch_equals_library_and_lora_merge_equals_unmerged(ckpts, tmp_path):
    ck = ckpts["gqa"]
    recs = [{"prompt": "Once upon a time"}, {"instruction": "Tell a story", "input": "about a cat"}, "Lily and Tom"]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    outs = {}
    for merge in (False, True):
        out = tmp_path / f"out{merge}.jsonl"
        cmd = [sys.executable, "scripts/generate.py", "--load-hf", str(ck), "--input-file", str(inp), "--output-file",
               str(out), "--micro-batch-size", "2", "--max-new-tokens", "10", "--lora-load", str(ck) + "_lora"]
        r = subprocess.run(cmd + (["--lora-merge"] if merge else []), cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[merge] = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [o["text"] for o in outs[False]] == [o["text"] for o in outs[True]]
    assert [o["index"] for o in outs[False]] == [0, 1, 2]
    from pmodel.checkpoint import peft as peft_io
    from pmodel.inference import GenerationConfig, complete
    model, params = pmodel.load_hf(ck)
    lm, lp = peft_io.load_adapter(model, params, str(ck) + "_lora")
    tok = pmodel.data.load_tokenizer(ck)
    want = complete(lm, lp, tok, ["Once upon a time"], GenerationConfig(max_new_tokens=10, stop_ids=(2,)))[0]
    assert outs[False][0]["text"] == want.text and outs[False][0]["completion_tokens"] == len(want.token_ids)


@pytest.mark.multiproc
def test_tp2_under_torch_distributed_launch_equals_one_process(ckpts, tmp_path):
    """ModelLink's launcher (torch.distributed.launch appends --local-rank) with TP2."""
    ck = ckpts["gqa"]
    common = ["--load-hf", str(ck), "--prompt", "Once upon a time", "--prompt", "Lily", "--max-new-tokens", "16",
              "--num-beams", "2"]
    one = subprocess.run([sys.executable, "scripts/generate.py", *common], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    port = str(29500 + os.getpid() % 1000)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port",
                          port, "scripts/generate.py", *common, "--tensor-model-parallel-size", "2"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = lambda s: [ln for ln in s.splitlines() if ln.startswith("{")]  # noqa: E731
    assert lines(two.stdout) == lines(one.stdout) and len(lines(one.stdout)) == 2
