"""ModelLink / Megatron flags of scripts/pretrain.py and finetune.py: each takes effect with its
Megatron meaning, or is refused naming the flag and the reason, or (kernel switches that cannot
change the numbers here) is noted once in the log. MoE flags map onto the ModelConfig MoE
fields, and an EP2 pretrain run under torchrun equals one process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pretrain.py"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_ml_flags", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PT = _load("pretrain")
BASE = ["--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "2", "--mock-data",
        "--no-progress"]
ARCH = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--vocab-size", "64"]


def _args(*extra):
    a = PT.build_parser().parse_args([*BASE, *extra])
    PT.validate(a)
    return a


def test_architecture_switches_take_effect():
    a = _args(*ARCH[:-2], "--normalization", "LayerNorm", "--norm-epsilon", "1e-6", "--position-embedding-type",
              "learned_absolute", "--add-qkv-bias", "--init-method-std", "0.01", "--padded-vocab-size", "80")
    cfg, _ = PT.build_config(a, None)
    assert (cfg.norm, cfg.norm_eps, cfg.position, cfg.qkv_bias, cfg.init_std, cfg.vocab_size) == \
        ("layer", 1e-6, "learned", True, 0.01, 80)
    a = _args(*ARCH, "--use-rotary-position-embeddings", "--rotary-base", "500000", "--disable-bias-linear",
              "--swiglu", "--untie-embeddings-and-output-weights")
    cfg, _ = PT.build_config(a, None)
    assert (cfg.position, cfg.rope_theta, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.activation,
            cfg.tie_embeddings) == ("rope", 500000.0, False, False, False, "swiglu", False)
    # a preset is a starting point the switches change
    cfg, _ = PT.build_config(_args("--model", "debug", "--normalization", "LayerNorm", "--add-qkv-bias"), None)
    assert cfg.norm == "layer" and cfg.qkv_bias


def test_hf_config_disagreement_is_refused_naming_both(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6}))
    ok = _args("--hf-config", str(tmp_path), "--num-layers", "2", "--normalization", "RMSNorm", "--swiglu",
               "--untie-embeddings-and-output-weights", "--disable-bias-linear")
    assert PT.build_config(ok, None)[0].num_layers == 2
    for extra, msg in ((["--normalization", "LayerNorm"], "--normalization gives norm='layer', the config 'rms'"),
                       (["--norm-epsilon", "1e-5"], "--norm-epsilon gives norm_eps=1e-05, the config 1e-06"),
                       (["--group-query-attention", "--num-query-groups", "4"], "--num-query-groups gives")):
        with pytest.raises(SystemExit, match=msg.replace("(", r"\(").replace(")", r"\)")):
            PT.build_config(_args("--hf-config", str(tmp_path), *extra), None)


@pytest.mark.parametrize("extra,msg", [
    (["--hidden-dropout", "0.1"], "--hidden-dropout 0.1: pmodel's decoder has no dropout"),
    (["--attention-dropout", "0.1"], "--attention-dropout 0.1: pmodel's decoder has no dropout"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "1"], "give one"),
    (["--lora-r", "8"], "LoRA is enabled by --lora-target-modules"),
    (["--is-instruction-dataset"], "give --data-path"),
    (["--padded-vocab-size", "80", "--vocab-size", "64"], "give one"),
    (["--use-rotary-position-embeddings", "--position-embedding-type", "alibi"], "contradicts"),
    (["--distributed-backend", "nccl"], "--distributed-backend nccl: no CUDA device"),
    (["--distributed-backend", "gloo", "--device", "cuda"], "--distributed-backend gloo cannot run --device cuda"),
    (["--tokenizer-type", "ByteTokenizer", "--tokenizer-not-use-fast"], "ByteTokenizer has no fast / slow"),
    (["--moe-token-drop-policy", "position"], "needs --moe-expert-capacity-factor"),
    (["--moe-pad-expert-input-to-capacity"], "without it routing is dropless"),
    (["--sequence-parallel", "--use-mc2"], "--use-mc2 .* needs --sequence-parallel"),
    (["--eval-iters", "-1", "--eval-interval", "1"], "--eval-iters must be >= 0"),
])
def test_refused_naming_flag_and_reason(extra, msg):
    if "nccl" in extra and (torch.cuda.is_available() or importlib.util.find_spec("torch_npu")):
        pytest.skip("an accelerator is present: nccl is served")
    with pytest.raises(SystemExit, match=msg):
        _args(*extra)


def test_no_op_switches_are_noted_once_and_change_nothing(tmp_path, capsys):
    """Kernel switches that cannot change the numbers here are noted once; the losses are
    bitwise those of the run without them. --lr-warmup-fraction is Megatron's (not rounded)."""
    common = [*BASE, *ARCH, "--train-iters", "3", "--log-interval", "1", "--lr-decay-style", "cosine"]
    switches = ["--attention-softmax-in-fp32", "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion",
                "--jit-compile", "--hidden-dropout", "0", "--attention-dropout", "0.0", "--distributed-backend", "gloo",
                "--local-rank", "0"]
    runs = {}
    for name, extra in (("plain", []), ("switches", switches)):
        m = tmp_path / f"{name}.jsonl"
        assert PT.main([*common, "--lr-warmup-iters", "1", "--metrics-file", str(m), *extra]) == 0
        runs[name] = [json.loads(x) for x in m.read_text().splitlines()]
    out = capsys.readouterr().out
    for flag in ("--attention-softmax-in-fp32", "--no-masked-softmax-fusion", "--no-gradient-accumulation-fusion",
                 "--jit-compile", "--distributed-backend"):
        assert out.count(f"note: {flag}") == 1, flag
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in runs["plain"]] == \
        [(r["loss"], r["grad_norm"], r["lr"]) for r in runs["switches"]]
    # Megatron: warmup = fraction x decay iters (0.5 x 3 = 1.5, not rounded)
    a = _args(*ARCH, "--lr-warmup-fraction", "0.5", "--lr-decay-style", "cosine", "--train-iters", "3")
    tx, _ = PT.cli.optimizer_of(a)
    from pmodel import optim
    want = optim.megatron(lr=1e-3, min_lr=0.0, warmup_steps=1.5, decay_steps=3, style="cosine")
    assert [want(c) for c in range(4)][:2] == [0.0, 1e-3 / 1.5]


def test_sequence_parallel_at_tp1_and_bf16_loss_scale_are_noted(capsys):
    assert PT.main([*BASE, *ARCH, "--sequence-parallel", "--bf16", "--initial-loss-scale", "4096"]) == 0
    out = capsys.readouterr().out
    assert "note: --sequence-parallel: off at --tensor-model-parallel-size 1" in out
    assert "note: --initial-loss-scale: --bf16 trains without loss scaling" in out


def test_moe_flags_map_onto_the_config_fields():
    a = _args(*ARCH, "--num-experts", "4", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0.01",
              "--moe-z-loss-coeff", "0.001", "--moe-expert-capacity-factor", "1.5", "--moe-token-drop-policy",
              "position", "--moe-pad-expert-input-to-capacity", "--ffn-hidden-size", "48")
    cfg, _ = PT.build_config(a, None)
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_aux_loss_coeff, cfg.moe_aux_loss_type, cfg.moe_z_loss_coeff,
            cfg.moe_capacity_factor, cfg.moe_drop_policy, cfg.moe_ffn_hidden_size) == \
        (4, 1, 0.01, "per_layer", 0.001, 1.5, "position", 48)
    with pytest.raises(SystemExit, match="--moe-grouped-gemm=True: the reference backend has no"):
        PT.cli.kernels_of(_args(*ARCH, "--num-experts", "4", "--moe-grouped-gemm"), torch.device("cpu"), "pretrain.py")
    with pytest.raises(SystemExit, match=r"invalid model configuration: .*--moe-router-topk=5 must be in \[1, --num-experts=4\]"):
        PT.build_config(_args(*ARCH, "--num-experts", "4", "--moe-router-topk", "5"), None)
    # finetune.py: the experts and top-k are the checkpoint's; losses / capacity are training settings
    FT = _load("finetune")
    import pmodel
    from pmodel.model import ModelConfig, build
    model = build(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=32,
                              num_experts=4), family="mixtral")
    fa = FT.build_parser().parse_args(["train", "--load-hf", "x", "--save", "y", "--data-path", "d.json",
                                       "--train-iters", "1", "--moe-aux-loss-coeff", "0.02",
                                       "--moe-expert-capacity-factor", "2"])
    m2 = FT._apply_moe_flags(fa, model)
    assert (m2.config.moe_aux_loss_coeff, m2.config.moe_capacity_factor) == (0.02, 2.0)
    fa.num_experts = 8
    with pytest.raises(SystemExit, match=r"--num-experts 8 \(checkpoint: 4\)"):
        FT._apply_moe_flags(fa, model)
    del pmodel


def test_ep_refused_on_a_dense_model(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="--expert-model-parallel-size 2 splits the experts .* this model is dense"):
        PT.main([*BASE, *ARCH, "--expert-model-parallel-size", "2"])


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.multiproc
def test_ep2_pretrain_under_torchrun_equals_one_process(tmp_path):
    """--expert-model-parallel-size 2 on 2 ranks (each holds 2 of 4 experts and reads its own
    micro-batches) gives the losses and grad norms of one process (1e-5 relative)."""
    common = [*BASE, *ARCH, "--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01",
              "--moe-z-loss-coeff", "0.001", "--ffn-hidden-size", "24", "--global-batch-size", "4",
              "--micro-batch-size", "1", "--train-iters", "3", "--log-interval", "1"]
    runs = {}
    for name, launcher, extra in (
            ("one", [sys.executable], []),
            ("ep2", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                     "127.0.0.1", "--master-port", str(free_port())], ["--expert-model-parallel-size", "2"])):
        m = tmp_path / f"{name}.jsonl"
        p = subprocess.run([*launcher, str(SCRIPT), *common, "--metrics-file", str(m), *extra], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = [json.loads(x) for x in m.read_text().splitlines()]
        if name == "ep2":
            assert "x ep 2" in p.stdout and "MoE: 4 experts" in p.stdout
    assert [r["step"] for r in runs["ep2"]] == [1, 2, 3]
    for a, b in zip(runs["ep2"], runs["one"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * abs(b["grad_norm"]), (a, b)


@pytest.mark.slow
@pytest.mark.multiproc
def test_fp16_initial_loss_scale_and_eval_interval_under_torchrun(tmp_path):
    """--fp16 --initial-loss-scale and --eval-interval under torchrun (TP2, torch.distributed.launch
    appending --local-rank): the scale starts where asked and evaluations are logged."""
    m = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(SCRIPT), *BASE, "--model", "debug", "--fp16", "--initial-loss-scale", "512", "--train-iters", "3",
           "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--tensor-model-parallel-size", "2",
           "--distributed-backend", "gloo", "--metrics-file", str(m)]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in m.read_text().splitlines()]
    train = [r for r in recs if "loss" in r and "eval_loss" not in r]
    assert [r["step"] for r in train] == [1, 2, 3] and train[0]["loss_scale"] == 512.0
    assert any("eval_loss" in r for r in recs)
