"""Optimizers vs torch.optim step by step; composition, masks, schedules, value_and_grad,
mixed precision and loss scaling."""

import pytest
import torch

from pmodel import optim, tree
from pmodel.autodiff import value_and_grad
from pmodel.precision import LossScale, Policy, bytes_per_param, last_step_skipped, loss_scale, mixed_precision


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed": {"weight": torch.randn(11, 6, generator=g)},
        "layers": [{"attn": {"q_proj": {"weight": torch.randn(6, 6, generator=g), "bias": torch.randn(6, generator=g)}},
                    "input_norm": {"weight": torch.randn(6, generator=g)}}],
        "lm_head": {"weight": torch.randn(11, 6, generator=g)},
    }


def _loss(p, x):
    h = p["embed"]["weight"][x]                                      # (N, 6)
    l0 = p["layers"][0]
    h = torch.tanh(h @ l0["attn"]["q_proj"]["weight"].T + l0["attn"]["q_proj"]["bias"]) * l0["input_norm"]["weight"]
    return torch.logsumexp(h @ p["lm_head"]["weight"].T, -1).mean()


def _torch_run(make_opt, steps, seed=0, grad_fn=_loss):
    p = tree.map(lambda t: t.clone().requires_grad_(True), _params(seed))
    leaves = tree.leaves(p)
    opt = make_opt(p)
    x = torch.arange(20) % 11
    for _ in range(steps):
        opt.zero_grad()
        grad_fn(p, x).backward()
        opt.step()
    return p


def _ours(tx, steps, seed=0, p=None):
    p = p or tree.map(lambda t: t.clone().requires_grad_(True), _params(seed))
    state = tx.init(p)
    vg = value_and_grad(_loss)
    x = torch.arange(20) % 11
    for _ in range(steps):
        _, g = vg(p, x)
        u, state = tx.update(g, state, p)
        optim.apply_updates(p, u)
    return p, state


def _close(a, b, rtol=1e-6, atol=1e-7):
    for (k, x), (_, y) in zip(tree.paths(a), tree.paths(b)):
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_matches_torch_with_decay_groups(fused):
    mask = optim.weight_decay_mask(_params())
    assert tree.get(mask, "layers.0.attn.q_proj.weight") and tree.get(mask, "lm_head.weight")
    assert not tree.get(mask, "embed.weight") and not tree.get(mask, "layers.0.attn.q_proj.bias")
    assert not tree.get(mask, "layers.0.input_norm.weight")

    def make(p):
        decay = [t for (k, t), m in zip(tree.paths(p), tree.leaves(mask)) if m]
        rest = [t for (k, t), m in zip(tree.paths(p), tree.leaves(mask)) if not m]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = _torch_run(make, 8)
    ours, state = _ours(optim.adamw(1e-2, 0.9, 0.95, 1e-8, weight_decay=0.1, fused=fused), 8)
    _close(ours, ref)
    assert optim.current_lr(state) == 1e-2


def test_adamw_schedule_matches_torch_lambda_lr():
    sched = optim.megatron(lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=6, style="cosine")
    holder = {}

    def make(p):
        opt = torch.optim.AdamW(tree.leaves(p), lr=1e-2, weight_decay=0.05)
        holder["s"] = torch.optim.lr_scheduler.LambdaLR(opt, lambda c: sched(c) / 1e-2)
        return opt

    p = tree.map(lambda t: t.clone().requires_grad_(True), _params())
    opt = make(p)
    x = torch.arange(20) % 11
    for _ in range(8):
        opt.zero_grad()
        _loss(p, x).backward()
        opt.step()
        holder["s"].step()
    ours, _ = _ours(optim.adamw(sched, weight_decay=0.05, mask=None), 8)
    _close(ours, p)
    unfused, _ = _ours(optim.adamw(sched, weight_decay=0.05, mask=None, fused=False), 8)
    _close(unfused, ours)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.01)])
def test_sgd_matches_torch(momentum, nesterov, wd):
    ref = _torch_run(lambda p: torch.optim.SGD(tree.leaves(p), lr=0.1, momentum=momentum, nesterov=nesterov,
                                               weight_decay=wd), 6)
    ours, _ = _ours(optim.sgd(0.1, momentum, nesterov=nesterov, weight_decay=wd), 6)
    _close(ours, ref)


def test_clip_by_global_norm_matches_torch():
    def run_torch():
        p = tree.map(lambda t: t.clone().requires_grad_(True), _params())
        opt = torch.optim.SGD(tree.leaves(p), lr=0.5)
        x = torch.arange(20) % 11
        norms = []
        for _ in range(3):
            opt.zero_grad()
            (_loss(p, x) * 50).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(tree.leaves(p), 1.0)))
            opt.step()
        return p, norms

    ref, norms = run_torch()
    p = tree.map(lambda t: t.clone().requires_grad_(True), _params())
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.5))
    state = tx.init(p)
    vg = value_and_grad(lambda p, x: _loss(p, x) * 50)
    x = torch.arange(20) % 11
    for i in range(3):
        _, g = vg(p, x)
        u, state = tx.update(g, state, p)
        assert float(state[0].norm) == pytest.approx(norms[i], rel=1e-6)
        optim.apply_updates(p, u)
    _close(p, ref)


def test_frozen_leaves_get_no_grad_no_state_no_update():
    p = tree.map(lambda t: t.clone().requires_grad_(True), _params())
    p["embed"]["weight"].requires_grad_(False)
    before = p["embed"]["weight"].clone()
    (v, g) = value_and_grad(_loss)(p, torch.arange(20) % 11)
    assert g["embed"]["weight"] is None and g["lm_head"]["weight"].shape == (11, 6)
    tx = optim.adamw(0.1)
    state = tx.init(optim.tree_map(lambda t: t if t.requires_grad else None, p))
    assert state[0].mu["embed"]["weight"] is None
    u, state = tx.update(g, state, p)
    optim.apply_updates(p, u)
    assert torch.equal(p["embed"]["weight"], before)
    # leaves stay the same autograd leaves
    assert p["lm_head"]["weight"].is_leaf and p["lm_head"]["weight"].requires_grad


def test_value_and_grad_matches_backward_and_aux():
    p = tree.map(lambda t: t.clone().requires_grad_(True), _params())
    x = torch.arange(20) % 11
    (v, aux), g = value_and_grad(lambda p, x: (_loss(p, x), {"n": 3}), has_aux=True)(p, x)
    _loss(p, x).backward()
    assert aux == {"n": 3} and not v.requires_grad
    for (k, a), (_, b) in zip(tree.paths(g), tree.paths(p)):
        assert torch.equal(a, b.grad), k


def test_masked_and_multi_transform():
    p = _params()
    g = tree.map(torch.ones_like, p)
    labels = tree.map_with_path(lambda k, t: "head" if k.startswith("lm_head") else "body", p)
    tx = optim.multi_transform({"head": optim.sgd(1.0), "body": optim.sgd(0.1)}, labels)
    u, _ = tx.update(g, tx.init(p), p)
    assert torch.equal(u["lm_head"]["weight"], -torch.ones(11, 6))
    assert torch.allclose(u["embed"]["weight"], torch.full((11, 6), -0.1))
    with pytest.raises(ValueError, match="no transform"):
        optim.multi_transform({"head": optim.sgd(1.0)}, labels).init(p)


def test_megatron_schedules():
    lin = optim.megatron(lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, style="linear")
    assert lin(0) == 0.0 and lin(5) == 0.5 and lin(10) == 1.0
    assert lin(60) == pytest.approx(0.55) and lin(110) == pytest.approx(0.1) and lin(500) == 0.1
    cos = optim.megatron(lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=100, style="cosine")
    assert cos(0) == 1.0 and cos(50) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert optim.megatron(lr=2.0, style="constant")(1000) == 2.0
    isr = optim.megatron(lr=1.0, warmup_steps=4, style="inverse-square-root")
    assert isr(16) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="decay_steps"):
        optim.megatron(lr=1.0, style="cosine")
    with pytest.raises(ValueError, match="style"):
        optim.megatron(lr=1.0, style="exp")


def test_accumulate_equals_mean_gradient():
    p1 = tree.map(lambda t: t.clone().requires_grad_(True), _params())
    p2 = tree.map(lambda t: t.clone().requires_grad_(True), _params())
    xs = [torch.arange(10) % 11, torch.arange(10, 20) % 11]
    tx = optim.accumulate(optim.adamw(1e-2), every=2)
    s = tx.init(p1)
    vg = value_and_grad(_loss)
    for x in xs:
        _, g = vg(p1, x)
        u, s = tx.update(g, s, p1)
        optim.apply_updates(p1, u)
    tx2 = optim.adamw(1e-2)
    s2 = tx2.init(p2)
    gs = [vg(p2, x)[1] for x in xs]
    g = tree.map(lambda a, b: (a + b) / 2, *gs)
    u, s2 = tx2.update(g, s2, p2)
    optim.apply_updates(p2, u)
    _close(p1, p2)


def test_bf16_mixed_precision_keeps_fp32_main_weights():
    """bf16 params + fp32 main weights = fp32 training of the main weights, rounded each step."""
    ref = tree.map(lambda t: t.clone().requires_grad_(True), _params())
    low = tree.map(lambda t: t.clone().to(torch.bfloat16).requires_grad_(True), _params())
    tx = mixed_precision(optim.adamw(1e-2, weight_decay=0.1), Policy(param_dtype="bf16"))
    state = tx.init(low)
    assert state.main["lm_head"]["weight"].dtype == torch.float32
    assert state.inner[0].mu["lm_head"]["weight"].dtype == torch.float32
    x = torch.arange(20) % 11
    vg = value_and_grad(_loss)
    for _ in range(3):
        _, g = vg(low, x)
        assert g["lm_head"]["weight"].dtype == torch.bfloat16
        u, state = tx.update(g, state, low)
        optim.apply_updates(low, u)
        # the model's params are exactly the rounded main weights
        for (k, p), (_, m) in zip(tree.paths(low), tree.paths(state.main)):
            assert torch.equal(p, m.to(torch.bfloat16)), k
    # updates too small for bf16 still accumulate in the main weights
    tiny = mixed_precision(optim.sgd(1e-6), Policy(param_dtype="bf16"))
    st = tiny.init(low)
    w0 = low["lm_head"]["weight"].clone()
    g1 = tree.map(torch.ones_like, low)
    for _ in range(2):
        u, st = tiny.update(g1, st, low)
        optim.apply_updates(low, u)
    assert torch.equal(low["lm_head"]["weight"], w0)
    assert not torch.equal(st.main["lm_head"]["weight"], w0.float())


def test_fp16_loss_scaling_skips_backs_off_and_grows():
    p = tree.map(lambda t: t.clone().to(torch.float16).requires_grad_(True), _params())
    pol = Policy(param_dtype="fp16", loss_scale=LossScale(initial=1024.0, growth_interval=2, hysteresis=1))
    tx = mixed_precision(optim.sgd(0.1), pol)
    st = tx.init(p)
    before = tree.map(torch.clone, p)
    bad = tree.map(lambda t: torch.full_like(t, float("inf")), p)
    u, st = tx.update(bad, st, p)
    optim.apply_updates(p, u)
    assert last_step_skipped(st) and loss_scale(st) == 512.0
    _close(p, before, rtol=0, atol=0)
    good = tree.map(lambda t: torch.full_like(t, 512.0), p)       # = 1.0 after unscaling
    for i in range(2):
        u, st = tx.update(good, st, p)
        optim.apply_updates(p, u)
        assert not last_step_skipped(st)
    assert loss_scale(st) == 1024.0                                   # grew after 2 clean steps
    torch.testing.assert_close(st.main["lm_head"]["weight"], before["lm_head"]["weight"].float() - 0.2)


def test_bytes_per_param_megatron_table():
    assert bytes_per_param(Policy(param_dtype="bf16")) == 20
    assert bytes_per_param(Policy(param_dtype="bf16", grad_accum_fp32=True)) == 18
    assert bytes_per_param(Policy()) == 16
    st = mixed_precision(optim.adamw(1e-3), Policy(param_dtype="bf16")).init(
        tree.map(lambda t: t.to(torch.bfloat16).requires_grad_(True), _params()))
    n = sum(t.numel() for t in tree.leaves(_params()))
    state_bytes = sum(t.numel() * t.element_size() for t in tree.leaves(st) if t.dim() > 0)
    assert state_bytes == 12 * n    # fp32 main + two fp32 moments
