"""The plan's pipeline path on 2 gloo ranks (PP2), against one process computed on every rank:

* the model's kernel policy reaches the stages: under ``Kernels(fused_cross_entropy=False)`` the
  last stage materialises the full ``(B, T, V)`` logits (an ``F.linear`` with V outputs), under
  the default it never does; the losses agree;
* ``plan.evaluate`` (the pipeline's forward-only pass) equals single-process evaluation;
* fp16 dynamic loss scaling: overflowing steps are skipped on both stages together (the decision
  comes from the all-reduced norm) with the loss-scale sequence and losses of one process.
"""
from __future__ import annotations

import pytest
import torch

from _dist import assert_all_ok, launch


def _batch(V, seed, B=4, T=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    labels = x[:, 1:].clone()
    labels[0, :3] = -100
    return [{"tokens": x[:2, :-1], "labels": labels[:2]}, {"tokens": x[2:, :-1], "labels": labels[2:]}]


def _worker(rank, world):
    from torch.overrides import TorchFunctionMode

    import pmodel
    from pmodel import optim
    from pmodel.ops import Kernels
    from pmodel.parallel import Mesh, PipelineSpec, parallelize
    from pmodel.precision import LossScale, Policy

    mesh = Mesh.build(pp=2)
    model = pmodel.families.preset("debug", num_layers=4)
    V = model.config.padded_vocab_size
    checks = {}

    class Logits(TorchFunctionMode):
        """Records every F.linear output shaped (B, T, V): full logits."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if getattr(func, "__name__", "") == "linear" and isinstance(out, torch.Tensor) and out.dim() == 3 \
                    and out.shape[-1] == V:
                self.seen.append(tuple(out.shape))
            return out

    single = pmodel.train.train_step(model, optim.sgd(0.1))
    ps = pmodel.init(model, seed=0)
    _, _, ref = single(ps, single.init(ps), _batch(V, 1))
    for fused in (True, False):
        m = model.replace(kernels=Kernels(fused_cross_entropy=fused))
        plan = parallelize(m, optim.sgd(0.1), mesh, pipeline=PipelineSpec())
        params = plan.init(0)
        st = plan.tx.init(params)
        watch = Logits()
        with watch:
            params, st, met = plan.step(params, st, _batch(V, 1))
        tag = f"fused_cross_entropy={fused}"
        err = abs(met["loss"] - ref["loss"]) / ref["loss"]
        checks[f"{tag}: loss == one process"] = None if err < 1e-6 else f"rel err {err:.2e}"
        if plan.pipe.is_last:
            want_full = not fused
            checks[f"{tag}: full logits materialised == {want_full}"] = None if bool(watch.seen) == want_full \
                else f"saw {watch.seen}"

    # Evaluation through the pipeline's forward-only pass.
    plan = parallelize(model, optim.sgd(0.1), mesh, pipeline=PipelineSpec(schedule="zero-bubble"))
    params = plan.init(3)
    batches = [_batch(V, 5), _batch(V, 6)]
    got = plan.evaluate(params, batches)
    want = pmodel.train.evaluate(model, pmodel.init(model, seed=3), batches)
    err = abs(got["loss"] - want["loss"]) / want["loss"]
    checks["evaluate == one process"] = None if err < 1e-6 and got["num_tokens"] == want["num_tokens"] \
        else f"{got} vs {want}"

    # fp16 loss scaling: 2**20 overflows the fp16 gradients at first.
    m16 = pmodel.families.preset("debug", num_layers=4, dtype=torch.float16)
    pol = Policy(param_dtype="fp16", loss_scale=LossScale(initial=2.0 ** 20, hysteresis=1))
    runs = {}
    for name in ("one", "pp2"):
        if name == "one":
            step = pmodel.train.train_step(m16, optim.adamw(1e-3), policy=pol)
            p, step_fn = pmodel.init(m16, seed=0), step
            st = step.init(p)
        else:
            plan = parallelize(m16, optim.adamw(1e-3), mesh, pipeline=PipelineSpec(), policy=pol)
            p, step_fn = plan.init(0), plan.step
            st = plan.tx.init(p)
        hist = []
        for s in range(14):
            p, st, met = step_fn(p, st, _batch(V, 10 + s))
            hist.append((met["skipped"], met["loss_scale"], met["loss"]))
        runs[name] = hist
    a, b = runs["one"], runs["pp2"]
    same = [x[:2] for x in a] == [x[:2] for x in b]
    checks["fp16: skipped steps and loss scales == one process"] = None if same else f"{a} vs {b}"
    checks["fp16: some steps skipped, later ones trained"] = None if a[0][0] and not a[-1][0] else f"{a}"
    bad = [(x, y) for x, y in zip(a, b) if not x[0] and abs(x[2] - y[2]) > 1e-3 * abs(x[2])]
    checks["fp16: losses == one process (fp16 resolution)"] = None if not bad else f"{bad[:2]}"
    return checks


@pytest.mark.multiproc
def test_plan_pipeline_kernels_evaluate_and_fp16_on_two_ranks():
    assert_all_ok(launch(_worker, 2, timeout_s=300))
