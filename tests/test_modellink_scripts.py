"""ModelLink's LLaMA-2 ``pretrain_*`` and ``tune_*`` example scripts run through scripts/pretrain.py.

Each script is read from ``../shared/data/modellink_examples/llama2`` and rewritten in exactly the
parts its README allows: the entry point (``pretrain_gpt.py`` -> ``scripts/pretrain.py``), the
paths (data, tokenizer, checkpoints, LoRA adapter) and the sizes (model dimensions, sequence
length, iteration and batch counts, TP / PP sizes and the launcher's process count: 2 processes
where the script uses TP or PP), plus CPU: ``--distributed-backend nccl`` -> ``gloo``. The Ascend
environment lines and the ``| tee`` plumbing are not run. The fused-kernel flags the CPU backend
lacks (``--use-fused-rmsnorm``, ``--use-fused-swiglu``, ``--use-fused-rotary-pos-emb``,
``--use-mc2``) are first shown to be refused naming the flag (on NPU they take effect), then left
out. Every other flag of the scripts is passed as written.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist import free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EXAMPLES = SHARED / "modellink_examples" / "llama2"
SCRIPTS = sorted(EXAMPLES.glob("pretrain_*.sh")) + sorted(EXAMPLES.glob("tune_*.sh"))
# (TP, PP) on 2 processes: TP2 where the script uses TP only, PP2 where it uses PP (and for one
# script of each kind that uses both, PP2 with the interleaved schedule or LoRA under PP).
# pretrain_llama2_7b_ptd.sh (TP1 x PP2 on 8 devices, i.e. DP4) passes --overlap-grad-reduce, which
# pmodel refuses with PP > 1 (naming the flag: the pipeline interleaves the micro-batches'
# backwards); it runs as DP2 here, where the overlap, ZeRO-1 and --sequence-parallel at TP1 act.
LAYOUT = {"pretrain_llama2_7b_ptd.sh": (1, 1), "pretrain_llama2_13B_ptd_8p.sh": (2, 1),
          "pretrain_llama2_34B_ptd_16p.sh": (2, 1), "pretrain_llama2_70b_ptd.sh": (1, 2),
          "tune_llama2_7b_ptd.sh": (2, 1), "tune_llama2_13b_ptd.sh": (2, 1), "tune_llama2_34b_ptd.sh": (2, 1),
          "tune_llama2_70b_ptd.sh": (1, 2)}
SIZES = {"--num-layers": "4", "--hidden-size": "64", "--ffn-hidden-size": "96", "--num-attention-heads": "4",
         "--num-query-groups": "2", "--micro-batch-size": "1", "--global-batch-size": "4", "--train-iters": "3",
         "--eval-interval": "2", "--num-layers-per-virtual-pipeline-stage": "1", "--nnodes": "1"}
CPU_MISSING = ("--use-fused-rmsnorm", "--use-fused-swiglu", "--use-fused-rotary-pos-emb", "--use-mc2")


def _pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_modellink_under_test", ROOT / "scripts" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def command(script: Path, paths: dict, seq: int) -> list[str]:
    """The launch command of a ModelLink script: its variables substituted (paths and sizes
    replaced), the launcher and entry point swapped, the ``| tee`` dropped."""
    text = script.read_text().replace("\\\n", " ")
    env = {}
    for m in re.finditer(r'^([A-Z_]+)=(?:"(.*?)"|([^\n]*))$', text, re.M | re.S):
        env[m.group(1)] = m.group(2) if m.group(2) is not None else m.group(3).split("#")[0].strip()
    tp, pp = LAYOUT[script.name]
    env.update(paths, TP=str(tp), PP=str(pp), GPUS_PER_NODE="2", NNODES="1", NPUS_PER_NODE="2",
               MASTER_PORT=str(free_port()))
    start = min(i for i in (text.find("\ntorchrun "), text.find("\npython -m torch.distributed.launch")) if i >= 0)
    cmd = text[start + 1:].split("| tee")[0]
    for _ in range(5):  # DISTRIBUTED_ARGS holds $NNODES etc.
        cmd = re.sub(r"\$\{(\w+)\}|\$\(\((.*?)\)\)|\$(\w+)",
                     lambda m: env.get(m.group(1) or m.group(3), "") if not m.group(2) else "", cmd)
    args = shlex.split(cmd)
    out = []
    for i, a in enumerate(args):
        prev = args[i - 1] if i else ""
        if prev in SIZES:
            a = SIZES[prev]
        elif prev in ("--seq-length", "--max-position-embeddings"):
            a = str(seq)
        elif prev == "--eval-iters" and a != "0":
            a = "1"
        elif prev == "--distributed-backend":
            a = "gloo"  # CPU
        out.append(a)
    # launcher and entry point
    i = out.index("pretrain_gpt.py")
    launcher = out[:i]
    if launcher[0] == "torchrun":
        launcher = [sys.executable, "-m", "torch.distributed.run"] + launcher[1:]
    else:
        assert launcher[:3] == ["python", "-m", "torch.distributed.launch"], launcher
        launcher = [sys.executable] + launcher[1:]
    return launcher + [str(ROOT / "scripts" / "pretrain.py")] + out[i + 1:]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer (stories260K), Megatron-format pretraining and instruction data, a tiny LLaMA
    base checkpoint (MHA and GQA) in the training format and a PEFT LoRA adapter for each."""
    if not EXAMPLES.exists() or not (SHARED / "models" / "stories260K" / "tokenizer.model").exists():
        pytest.skip("../shared/data (ModelLink examples, stories260K) not present (fresh clone)")
    import pmodel
    from pmodel import lora as L
    from pmodel.checkpoint import peft as peft_io
    from pmodel.checkpoint import sharded
    from pmodel.data import PreprocessConfig, preprocess
    from pmodel.model import ModelConfig, build
    d = tmp_path_factory.mktemp("modellink")
    tok = SHARED / "models" / "stories260K"
    text = (SHARED / "pretrain" / "tinystories_train_2MiB.txt").read_text(encoding="utf-8")[:60_000]
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in text.split("<|endoftext|>") if t.strip()))
    preprocess(PreprocessConfig(inputs=(str(d / "corpus.jsonl"),), output_prefix=str(d / "corpus"),
                                tokenizer=str(tok / "tokenizer.model"), append_eod=True, progress=False,
                                log_interval=0))
    recs = json.loads((SHARED / "sft" / "alpaca" / "alpaca_data_first1000.json").read_text(encoding="utf-8"))
    recs = [r for r in recs if len(r["instruction"] + r["input"] + r["output"]) < 160][:40]
    (d / "alpaca.json").write_text(json.dumps(recs))
    preprocess(PreprocessConfig(inputs=(str(d / "alpaca.json"),), output_prefix=str(d / "alpaca"),
                                handler="GeneralInstructionHandler", tokenizer=str(tok), append_eod=True,
                                seq_length=320, progress=False, log_interval=0))
    out = {"dir": d, "tok": tok, "corpus": d / "corpus_text_document", "alpaca": d / "alpaca"}
    for kind, kv in (("mha", 4), ("gqa", 2)):
        cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=kv,
                          ffn_hidden_size=96, max_position_embeddings=320)
        model = build(cfg, family="llama")
        params = pmodel.init(model, seed=3)
        for seq in (64, 320):  # the pretraining / tuning sequence lengths (max-position-embeddings)
            c = ModelConfig.from_dict({**cfg.to_dict(), "max_position_embeddings": seq})
            sharded.save(d / f"base_{kind}_{seq}", 0, params=params, config=c.to_dict(), extra={"family": "llama"})
        lm = L.lora(model, 16, 32.0, 0.0, ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
        lp = L.adapt(lm, params, seed=1)
        with torch.no_grad():
            for n in pmodel.tree.leaves(lp, is_leaf=L.is_lora):
                if L.is_lora(n):
                    n.b.normal_(0, 0.02)
        peft_io.save_adapter(lm, lp, d / f"lora_{kind}")
    return out


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_modellink_script_runs(assets, script, tmp_path):
    text = script.read_text()
    kind = "gqa" if "--group-query-attention" in text else "mha"
    tune = script.name.startswith("tune_")
    seq = 320 if tune else 64
    save = tmp_path / "save"
    paths = {"CKPT_SAVE_DIR": str(save), "CKPT_LOAD_DIR": str(assets["dir"] / f"base_{kind}_{seq}"),
             "DATA_PATH": str(assets["alpaca"] if tune else assets["corpus"]),
             "TOKENIZER_MODEL": str(assets["tok"] / "tokenizer.model") if not tune else str(assets["tok"]),
             "TOKENIZER_PATH": str(assets["tok"]), "LORA_CHECKPOINT": str(assets["dir"] / f"lora_{kind}")}
    cmd = command(script, paths, seq)
    i = cmd.index(str(ROOT / "scripts" / "pretrain.py"))
    flags = cmd[i + 1:]
    # On CPU the fused kernels the reference backend lacks are refused, naming the flag.
    pt = _pretrain()
    a = pt.build_parser().parse_args(flags)
    missing = [f for f in CPU_MISSING if f in flags]
    if missing:
        with pytest.raises(SystemExit, match=f"{missing[0]}=True: the reference backend has no"):
            pt.cli.kernels_of(a, torch.device("cpu"), "pretrain.py")
    run = cmd[:i + 1] + [f for f in flags if f not in CPU_MISSING]
    r = subprocess.run(run, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"{shlex.join(run)}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}"
    recs = [json.loads(ln) for ln in (save / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if "loss" in x and "eval_loss" not in x]
    assert [x["step"] for x in train] == [1, 2, 3]
    assert all(math.isfinite(x["loss"]) for x in train)
    out = r.stdout
    # the documented no-ops say what they map to, once
    for flag in ("--attention-softmax-in-fp32", "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion",
                 "--jit-compile"):
        if flag in flags:
            assert out.count(f"note: {flag}") == 1, (flag, out[-3000:])
    if "--initial-loss-scale" in flags:
        assert "note: --initial-loss-scale" in out
    assert ("loaded the base parameters" in out) if tune else ("parameters only" in out)
    tp, pp = LAYOUT[script.name]
    assert f"pp {pp} x dp {2 // (tp * pp)} x tp {tp}" in out
    if tp == 1 and "--sequence-parallel" in flags:
        assert "note: --sequence-parallel: off at --tensor-model-parallel-size 1" in out
    if tune:
        assert "LoRA adapter from" in out and (save / "adapter" / "adapter_config.json").exists()
        assert "trainable" not in r.stderr
        if "split 100,0,0" in " ".join(flags) and "--eval-iters 0" not in " ".join(flags):
            assert "nothing is evaluated (as Megatron)" in out
    else:
        assert any("eval_loss" in x for x in recs)  # --eval-interval under torchrun
    assert (save / "latest").exists()
