"""train_step / train loop: equivalence with a plain torch loop, accumulation = big batch,
mixed precision, loss-scale skips in the log, metrics files and the plot script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pmodel
from pmodel import optim, tree
from pmodel.precision import LossScale, Policy, cast_params
from pmodel.train import LoopConfig, TrainState, evaluate, flops_per_token, train, train_step

ROOT = Path(__file__).resolve().parents[1]


def _model(**kw):
    return pmodel.families.preset("debug", **kw)


def _batch(cfg, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    lab = x[:, 1:].clone()
    lab[0, :3] = -100
    return {"tokens": x[:, :-1], "labels": lab}


def _clone(p):
    return tree.map(lambda t: t.detach().clone().requires_grad_(t.requires_grad), p)


def test_train_step_matches_plain_torch_adamw():
    model = _model()
    params = pmodel.init(model, seed=0)
    ref = _clone(params)
    step = train_step(model, optim.adamw(1e-3, weight_decay=0.0), max_grad_norm=1.0)
    state = step.init(params)
    opt = torch.optim.AdamW(tree.leaves(ref), lr=1e-3, weight_decay=0.0)
    for i in range(3):
        b = _batch(model.config, seed=i)
        params, state, m = step(params, state, b)
        opt.zero_grad()
        loss, _ = model.loss(ref, b)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(tree.leaves(ref), 1.0)
        opt.step()
        assert m["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
        assert m["grad_norm"] == pytest.approx(float(gn), rel=1e-5)
    for (k, a), (_, b) in zip(tree.paths(params), tree.paths(ref)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=k)


def test_accumulated_micro_batches_equal_one_big_batch():
    model = _model()
    p1 = pmodel.init(model, seed=1)
    p2 = _clone(p1)
    tx = optim.sgd(0.5)
    big = _batch(model.config, B=4, seed=3)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    st1, st2 = train_step(model, tx), train_step(model, tx, policy=Policy(grad_accum_fp32=True))
    _, _, m1 = st1(p1, st1.init(p1), big)
    _, _, m2 = st2(p2, st2.init(p2), halves)
    assert m1["num_tokens"] == m2["num_tokens"] == 4 * 16 - 3
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6)
    for (k, a), (_, b) in zip(tree.paths(p1), tree.paths(p2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


def test_bf16_training_tracks_fp32():
    m32 = _model()
    m16 = _model(dtype=torch.bfloat16)
    p32 = pmodel.init(m32, seed=0)
    p16 = cast_params(_clone(p32), torch.bfloat16)
    pol = Policy(param_dtype="bf16", grad_accum_fp32=True)
    st16, st32 = train_step(m16, optim.adamw(3e-3), policy=pol), train_step(m32, optim.adamw(3e-3))
    s16, s32 = st16.init(p16), st32.init(p32)
    b = _batch(m32.config, B=4, T=32)
    for _ in range(5):
        p16, s16, a = st16(p16, s16, b)
        p32, s32, c = st32(p32, s32, b)
        assert a["loss"] == pytest.approx(c["loss"], abs=0.05)   # bf16 activations: ~3 significant digits
    assert p16["layers"][0]["attn"]["q_proj"]["weight"].dtype == torch.bfloat16
    # fp32 main weights: the optimizer state holds an fp32 copy the bf16 params are rounded from
    main = s16.inner.main["layers"][0]["attn"]["q_proj"]["weight"]
    assert main.dtype == torch.float32
    assert torch.equal(main.to(torch.bfloat16), p16["layers"][0]["attn"]["q_proj"]["weight"].detach())
    with pytest.raises(ValueError, match="param_dtype"):
        train_step(m32, optim.adamw(3e-3), policy=pol)


def test_loop_logs_metrics_evaluates_saves_and_plots(tmp_path):
    model = _model()
    params = pmodel.init(model, seed=0)
    tx = optim.adamw(optim.megatron(lr=1e-3, min_lr=1e-4, warmup_steps=2, decay_steps=6, style="cosine"))
    step = train_step(model, tx)
    state = step.init(params)
    data = lambda start: (_batch(model.config, seed=start + i) for i in range(10**6))
    ev = lambda: [_batch(model.config, seed=-1 - i) for i in range(2)]
    lines = []
    loop = LoopConfig(train_iters=6, log_interval=2, eval_interval=3, eval_iters=2, save_interval=3,
                      metrics_path=str(tmp_path / "m.jsonl"), progress=False, peak_flops=1e12)

    def save(st, p, o):
        return step.plan.save_checkpoint(tmp_path / "ck", st.step, p, o, config=model.config.to_dict(),
                                         data={"consumed_samples": st.consumed_samples})
    params, state, pos, hist = train(step, params, state, data, loop=loop, evaluate=step.plan.evaluate, eval_data=ev,
                                     save=save, config=model.config, log=lines.append)
    assert pos == TrainState(step=6, consumed_samples=12)
    recs = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    logs = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in logs] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    for r in logs:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["peak_mem_bytes"] > 0 and r["grad_norm"] > 0
    assert logs[0]["lr"] == pytest.approx(1e-3 * 1 / 2)  # lr of the 2nd update (count 1 in warmup)
    assert evals[-1]["eval_loss"] == pytest.approx(evaluate(model, params, ev())["loss"], rel=1e-6)
    assert any(line.startswith("iter 2/6 | loss") and "mfu" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["iter_0000003", "iter_0000006", "latest"]
    out = tmp_path / "curve.png"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_metrics.py"), str(tmp_path / "m.jsonl"),
                        "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fp16_overflow_skip_shows_in_log():
    model = _model(dtype=torch.float16)
    params = cast_params(pmodel.init(model, seed=0), torch.float16)
    pol = Policy(param_dtype="fp16", loss_scale=LossScale(initial=2.0 ** 40, hysteresis=1))
    step = train_step(model, optim.adamw(1e-3), policy=pol)
    state = step.init(params)
    lines = []
    data = lambda start: (_batch(model.config, seed=i) for i in range(10**6))
    params, state, pos, hist = train(step, params, state, data, log=lines.append,
                                     loop=LoopConfig(train_iters=3, log_interval=1, progress=False))
    # 2**40 overflows fp16 gradients: the first steps are skipped and the scale halves each time
    assert any("step skipped" in x for x in lines)
    assert hist[0]["skipped"] == 1 and hist[0]["loss_scale"] == 2.0 ** 40
    assert "loss scale" in lines[-1]


def test_flops_per_token_formula():
    cfg = _model().config
    n = cfg.num_params(embeddings=False)
    assert flops_per_token(cfg, 128) == 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 128


def _nan_from(first_bad: int, last_bad: int = 10**9):
    """A micro-batch hook that makes the loss NaN for the steps numbered first_bad..last_bad
    (one micro-batch per step); the stored params are never touched."""
    def hook(params, index):
        if index is None or not first_bad <= index <= last_bad:
            return params
        w = params["embed"]["weight"]
        return {**params, "embed": {**params["embed"], "weight": w * float("nan")}}
    return hook


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run():
    from pmodel.train import NonFiniteError
    model = _model()
    step = train_step(model, optim.adamw(1e-3), micro_batch_hook=_nan_from(2))
    params = pmodel.init(model, seed=0)
    opt_state = step.init(params)
    batches = [_batch(model.config, seed=i) for i in range(10)]
    good = {}
    saved = []

    def save(st, p, o):
        saved.append((st.step, all(bool(torch.isfinite(t).all()) for t in tree.leaves(p))))
        return None

    lines = []
    orig_step = step

    def spy(p, o, b):
        p, o, m = orig_step(p, o, b)
        if not m["nonfinite"]:
            good["params"] = _clone(p)
        return p, o, m
    with pytest.raises(NonFiniteError, match=r"non-finite for 3 consecutive steps"):
        train(spy, params, opt_state, lambda s: iter(batches), save=save, log=lines.append,
              loop=LoopConfig(train_iters=10, log_interval=1, save_interval=1, progress=False,
                              max_nonfinite_steps=3))
    # Steps 1, 2 trained; 3, 4, 5 were non-finite: skipped (the params are those after step 2),
    # and the run stopped at 5 without saving anything after step 2.
    assert sum("update skipped" in x for x in lines) == 3, lines
    assert saved == [(1, True), (2, True)], saved
    for (k, a), (_, b) in zip(tree.paths(params), tree.paths(good["params"])):
        assert torch.equal(a, b), k
    assert all(bool(torch.isfinite(t).all()) for t in tree.leaves(params))


def test_isolated_nonfinite_step_is_skipped_and_the_run_goes_on():
    model = _model()
    step = train_step(model, optim.adamw(1e-3), micro_batch_hook=_nan_from(1, 1))
    params = pmodel.init(model, seed=0)
    batches = [_batch(model.config, seed=i) for i in range(4)]
    _, _, st, hist = train(step, params, step.init(params), lambda s: iter(batches), log=lambda s: None,
                           loop=LoopConfig(train_iters=4, log_interval=1, progress=False, max_nonfinite_steps=1 + 1))
    assert st.step == 4
    assert [h["skipped"] for h in hist] == [0, 1, 0, 0]
    assert all(bool(torch.isfinite(t).all()) for t in tree.leaves(params))
