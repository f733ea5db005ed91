"""scripts/pretrain.py: flags take effect or are refused with the reason."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_script", ROOT / "scripts" / "pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PT = _script()
BASE = ["--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters", "2", "--mock-data",
        "--no-progress"]


def _args(*extra):
    a = PT.build_parser().parse_args([*BASE, *extra])
    PT.validate(a)
    return a


@pytest.mark.parametrize("extra,msg", [
    (["--bf16", "--fp16"], "exclusive"),
    (["--initial-loss-scale", "1024"], "need --fp16"),
    (["--num-query-groups", "2"], "only with --group-query-attention"),
    (["--group-query-attention"], "needs --num-query-groups"),
    (["--global-batch-size", "3"], "not a multiple"),
    (["--save-interval", "5"], "needs --save"),
    (["--accumulate-allreduce-grads-in-fp32"], "needs --bf16 or --fp16"),
    (["--split", "90,10,0"], "--split applies to --data-path"),
    (["--model", "debug", "--hf-config", "x"], "give one"),
    (["--lr-warmup-iters", "5", "--lr-decay-style", "cosine"], "must be below the decay length"),
    (["--eval-iters", "5"], "without --eval-interval nothing is evaluated"),
    (["--lr-decay-style", "constant", "--lr-decay-iters", "10"], "has no decay length"),
    (["--lr-decay-style", "inverse-square-root", "--lr-decay-iters", "10"], "has no decay length"),
    (["--lr-decay-style", "constant", "--min-lr", "1e-5"], "constant never uses it"),
    (["--tokenizer-type", "ByteTokenizer", "--tokenizer-model", "t.model"], "ByteTokenizer reads no file"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
    (["--use-mc2"], "--use-mc2 .* needs --sequence-parallel"),
    (["--tokenizer-model", "a.model", "--tokenizer-name-or-path", "dir"], "give one of"),
    (["--tokenizer-type", "Llama2Tokenizer"], "needs --tokenizer-name-or-path or --tokenizer-model"),
])
def test_refused_combinations(extra, msg):
    with pytest.raises(SystemExit, match=msg):
        _args(*extra)


def test_architecture_flags_take_effect():
    a = _args("--num-layers", "3", "--hidden-size", "48", "--num-attention-heads", "4", "--group-query-attention",
              "--num-query-groups", "2", "--ffn-hidden-size", "100", "--vocab-size", "300",
              "--make-vocab-size-divisible-by", "64", "--bf16")
    cfg, fam = PT.build_config(a, None)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.ffn_hidden_size) == (3, 48, 4, 2, 100)
    assert cfg.vocab_size == 300 and cfg.padded_vocab_size == 320 and cfg.dtype == torch.bfloat16
    assert cfg.max_position_embeddings == 16 and fam == "llama"
    a = _args("--model", "debug", "--num-layers", "1")
    cfg, fam = PT.build_config(a, None)
    assert cfg.num_layers == 1 and fam == "llama"
    with pytest.raises(SystemExit, match="exceeds --max-position-embeddings"):
        PT.build_config(_args("--model", "debug", "--max-position-embeddings", "8"), None)
    with pytest.raises(SystemExit, match="--num-layers"):
        PT.build_config(_args("--hidden-size", "8"), None)


def test_optimizer_flags_take_effect():
    import pmodel
    from pmodel.model import build
    a = _args("--model", "debug", "--fp16", "--initial-loss-scale", "512", "--loss-scale-window", "7", "--clip-grad", "0",
              "--lr-warmup-iters", "1", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--train-iters", "4")
    pol = PT.cli.policy_of(a)
    tx, clip = PT.cli.optimizer_of(a)
    assert pol.loss_scale.initial == 512.0 and pol.loss_scale.growth_interval == 7
    assert clip is None                                          # --clip-grad 0: no clipping
    cfg, fam = PT.build_config(a, None)
    model = build(cfg, family=fam)
    step = pmodel.train.train_step(model, tx, policy=pol, max_grad_norm=clip)
    st = step.init(pmodel.init(model))
    assert float(st.loss_scale.scale) == 512.0
    assert st.inner.main["embed"]["weight"].dtype == torch.float32   # fp32 main weights for fp16 params
    assert step.plan.max_grad_norm is None
    assert PT.cli.optimizer_of(_args("--model", "debug", "--clip-grad", "0.5"))[1] == 0.5


def test_end_to_end_with_indexed_data_and_tokenizer(tmp_path):
    """--data-path / --split / --tokenizer-* through pmodel.data on a tiny written dataset."""
    import numpy as np
    from pmodel.data import write_indexed_dataset
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 250, rng.integers(20, 60)).astype(np.int64) for _ in range(60)]
    prefix = tmp_path / "corpus"
    write_indexed_dataset(str(prefix), docs) if _takes_docs() else pytest.skip("write_indexed_dataset API differs")
    rc = PT.main(["--model", "debug", "--vocab-size", "300", "--seq-length", "16", "--micro-batch-size", "2",
                  "--global-batch-size", "4", "--lr", "1e-3", "--train-iters", "3", "--data-path", str(prefix),
                  "--split", "80,20,0", "--eval-interval", "3", "--eval-iters", "1", "--log-interval", "1",
                  "--tokenizer-type", "ByteTokenizer", "--no-progress", "--save", str(tmp_path / "ck")])
    assert rc == 0
    assert (tmp_path / "ck" / "iter_0000003" / "manifest.json").exists()


def _takes_docs():
    import inspect
    from pmodel.data import write_indexed_dataset
    return len(inspect.signature(write_indexed_dataset).parameters) >= 2


def test_hf_config_and_refused_resume_with_other_config(tmp_path):
    import json
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6}))
    cfg, fam = PT.build_config(_args("--hf-config", str(tmp_path / "hf")), None)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_kv_heads, cfg.norm_eps, fam) == (128, 32, 2, 1e-6, "llama")
    common = ["--hf-config", str(tmp_path / "hf"), *BASE, "--save", str(tmp_path / "ck")]
    assert PT.main(common) == 0
    # An HF config describes a checkpoint: a flag that disagrees with it is refused, naming both.
    with pytest.raises(SystemExit, match="--num-layers gives num_layers=1, the config 2"):
        PT.main([*common, "--num-layers", "1"])
    assert PT.main([*common, "--num-layers", "2", "--train-iters", "3", "--load", str(tmp_path / "ck")]) == 0
    # Resuming with another architecture is refused naming the flag and both values.
    cfg2 = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf2").mkdir()
    (tmp_path / "hf2" / "config.json").write_text(json.dumps({**cfg2, "num_hidden_layers": 1}))
    with pytest.raises(SystemExit, match="--num-layers: checkpoint num_layers=2, this run 1"):
        PT.main(["--hf-config", str(tmp_path / "hf2"), *BASE, "--load", str(tmp_path / "ck"), "--train-iters", "4"])


def test_plot_metrics_names_file_and_line_of_bad_records(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_metrics_script", ROOT / "scripts" / "plot_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    f = tmp_path / "m.jsonl"
    f.write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\n\n{"iter": 2, "loss": 1.5}\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"m\.jsonl:3: expected a JSON object with 'step'"):
        mod.read(f)
    f.write_text('{"step": 1, "loss": 2.0}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(SystemExit, match=r"m\.jsonl:2: expected a JSON object"):
        mod.read(f)
    with pytest.raises(SystemExit, match=r"missing\.jsonl: cannot read"):
        mod.read(tmp_path / "missing.jsonl")
    f.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.0}\n', encoding="utf-8")
    assert [r["step"] for r in mod.read(f)] == [1, 2]


@pytest.mark.parametrize("flag, ok", [("--use-flash-attn", True), ("--use-fused-rmsnorm", False),
                                      ("--use-fused-swiglu", False), ("--use-fused-rotary-pos-emb", False)])
def test_fusion_flags_take_effect_or_are_refused_on_cpu(flag, ok):
    """On CPU (the reference backend) only attention has a fused kernel (SDPA); asking for the
    others is refused with the reason instead of silently running the unfused ops."""
    a = _args("--model", "debug", flag)
    if ok:
        k = PT.cli.kernels_of(a, torch.device("cpu"), "pretrain.py")
        assert k.backend == "reference" and k.fused_attention
    else:
        with pytest.raises(SystemExit, match=f"{flag}=True: the reference backend has no"):
            PT.cli.kernels_of(a, torch.device("cpu"), "pretrain.py")


def test_load_hf_starts_from_the_checkpoint_weights_and_reads_its_tokenizer_folder(tmp_path, capsys):
    """--load-hf (continued pretraining) trains from the HF weights: the first logged loss is the
    checkpoint's loss on the first batch; --tokenizer-name-or-path reads the SentencePiece folder."""
    import json
    base = SHARED / "models" / "stories260K"
    if not (base / "model.safetensors").exists():
        pytest.skip("../shared/data/models/stories260K not present (fresh clone)")
    import pmodel
    m = tmp_path / "m.jsonl"
    assert PT.main(["--load-hf", str(base), "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path",
                    str(base), *BASE, "--train-iters", "1", "--log-interval", "1", "--metrics-file", str(m)]) == 0
    first = json.loads(m.read_text().splitlines()[0])
    model, params = pmodel.load_hf(base)
    ds = PT.MockDataset(model.config.vocab_size, 16, 1234)
    rows = [ds.sample(i) for i in range(2)]
    batch = {k: torch.from_numpy(__import__("numpy").stack([r[k] for r in rows])) for k in ("tokens", "labels")}
    want = float(model.loss(params, batch)[0].detach())
    assert first["loss"] == pytest.approx(want, rel=1e-6)


def test_diverging_run_stops_with_an_error_and_latest_stays_finite(tmp_path):
    """--lr 1e6 without clipping diverges: the non-finite steps are skipped, the run stops after
    --max-nonfinite-steps of them with an error, and no checkpoint holds non-finite values."""
    from safetensors.torch import load_file
    ck = tmp_path / "ck"
    args = ["--model", "debug", "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e6", "--clip-grad", "0",
            "--lr-decay-style", "constant", "--train-iters", "30", "--mock-data", "--no-progress",
            "--save", str(ck), "--save-interval", "1", "--max-nonfinite-steps", "2", "--log-interval", "1"]
    with pytest.raises(SystemExit, match="non-finite for 2 consecutive steps"):
        PT.main(args)
    for d in sorted(ck.glob("iter_*")):
        for f in d.glob("*.safetensors"):
            for k, t in load_file(str(f)).items():
                assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (f, k)


def test_load_of_a_missing_path_is_refused_unless_allowed(tmp_path):
    common = ["--model", "debug", *BASE, "--save", str(tmp_path / "sv")]
    with pytest.raises(SystemExit, match=r"--load .*sv_typo does not exist; give --load-if-exists"):
        PT.main([*common, "--load", str(tmp_path / "sv_typo")])
    assert not (tmp_path / "sv").exists()  # nothing written
    assert PT.main([*common, "--load", str(tmp_path / "sv_typo"), "--load-if-exists"]) == 0
    assert PT.main([*common, "--load", str(tmp_path / "sv"), "--train-iters", "3"]) == 0  # auto-resume: --load = --save
    assert PT.main(["--model", "debug", *BASE, "--save", str(tmp_path / "sv2"), "--load", str(tmp_path / "sv2")]) == 0


def test_token_ids_above_the_vocabulary_are_refused_naming_them(tmp_path):
    import numpy as np
    from pmodel.data import write_indexed_dataset
    docs = [np.arange(200, 260, dtype=np.int64) for _ in range(20)]
    write_indexed_dataset(str(tmp_path / "corpus"), docs)
    with pytest.raises(SystemExit, match=r"token id 2\d\d in the tokens does not fit the model's vocabulary of 100 "
                                         r"\(ids 0..99; max id in the batch 2\d\d\)"):
        PT.main(["--model", "debug", "--vocab-size", "100", "--seq-length", "16", "--micro-batch-size", "2",
                 "--lr", "1e-3", "--train-iters", "2", "--data-path", str(tmp_path / "corpus"), "--split", "100,0,0",
                 "--no-progress"])


@pytest.mark.parametrize("field,value,msg", [
    ("num_hidden_layers", 1e9, r"'num_hidden_layers' = 1000000000.0 must be an integer"),
    ("hidden_size", [64], r"'hidden_size' = \[64\] must be an integer"),
    ("vocab_size", None, r"'vocab_size' is null"),
    ("num_attention_heads", "abc", r"'num_attention_heads' = 'abc' must be an integer"),
    ("intermediate_size", 5.5, r"'intermediate_size' = 5.5 must be an integer"),
    ("num_hidden_layers", 10**9, r"'num_hidden_layers' = 1000000000 is outside"),
    ("rms_norm_eps", "x", r"'rms_norm_eps' = 'x' must be a finite number"),
])
def test_hf_config_fields_are_validated_naming_field_and_file(tmp_path, field, value, msg):
    import json

    import pmodel
    cfg = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-6, field: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: field " + msg):
        pmodel.load_hf(tmp_path)


def test_user_errors_are_one_error_line_without_traceback_unless_debug(tmp_path):
    import json
    import os
    import subprocess
    import sys
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 128, "hidden_size": "abc", "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64}))
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--hf-config", str(tmp_path / "hf"), *BASE]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("pretrain.py: error: ") and "'hidden_size' = 'abc'" in err[0], err
    r = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_load_hf_refuses_a_config_far_larger_than_its_weights_before_building_it(tmp_path):
    """A config.json whose size the weights on disk cannot support (here 60,000 layers over a
    2-layer checkpoint) is refused from the safetensors headers, before any declaration is built."""
    import json
    import time

    import pmodel
    model = pmodel.families.preset("debug")
    pmodel.save_hf(model, pmodel.init(model, seed=0), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_hidden_layers"] = 60_000  # within the field range check, far beyond the weights
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"config\.json: describes .* parameters \(60000 layers.*refusing"):
        pmodel.load_hf(tmp_path)
    assert time.perf_counter() - t0 < 30  # bounded: nothing of 60,000 layers was built


def test_save_into_a_folder_of_another_config_is_refused(tmp_path):
    """--save into a folder holding another model config's checkpoints is refused (nothing is
    overwritten); the same config, or resuming in place, is allowed."""
    ck = tmp_path / "ck"
    assert PT.main(["--model", "debug", *BASE, "--save", str(ck)]) == 0
    before = sorted(p.name for p in ck.iterdir())
    with pytest.raises(SystemExit, match=r"--save .* already holds checkpoints of another model config .*num_layers"):
        PT.main(["--model", "debug", "--num-layers", "1", *BASE, "--save", str(ck)])
    assert sorted(p.name for p in ck.iterdir()) == before
    assert PT.main(["--model", "debug", *BASE, "--train-iters", "3", "--save", str(ck), "--load", str(ck)]) == 0
