"""LoRA transform: equivalence with the plain model, merged weights and an explicit reference."""
from __future__ import annotations

import pytest
import torch

import pmodel
from pmodel import lora as L
from pmodel import tree

ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _setup(targets=ALL7, rank=4, alpha=8.0, dropout=0.0, qkv_bias=False, seed=0):
    model = pmodel.families.preset("debug", qkv_bias=qkv_bias, num_layers=2)
    params = pmodel.init(model, seed=seed)
    lm = L.lora(model, rank, alpha, dropout, targets)
    return model, params, lm, L.adapt(lm, params, seed=1)


def _randomise_b(lp, seed=2, std=0.05):
    g = torch.Generator().manual_seed(seed)

    def go(n):
        if not L.is_lora(n):
            return n
        b = (torch.randn(n.b.shape, generator=g) * std).requires_grad_(True)
        return n.replace(b=b)

    return tree.map(go, lp, is_leaf=L.is_lora)


def _batch(vocab=512, B=2, T=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (B, T + 1), generator=g)
    labels = toks[:, 1:].clone()
    labels[0, :3] = -100  # some ignored (prompt) positions
    return {"tokens": toks[:, :-1], "labels": labels}


def test_zero_b_gives_exactly_the_base_outputs():
    model, params, lm, lp = _setup()
    toks = _batch()["tokens"]
    with torch.no_grad():
        assert torch.equal(lm.apply(lp, toks), model.apply(params, toks))


def test_defs_trainable_only_adapters_and_init_matches_peft_scheme():
    _, _, lm, _ = _setup(targets=("q_proj", "v_proj"))
    decls = tree.paths(lm.defs, is_leaf=pmodel.params.is_decl)
    trainable = [p for p, d in decls if d.trainable]
    assert trainable and all(p.endswith((".a", ".b")) for p in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x q,v x (a, b)
    params = pmodel.init(lm, seed=0)
    for p, t in tree.paths(params):
        assert t.requires_grad == p.endswith((".a", ".b")), p
        if p.endswith(".b"):
            assert torch.count_nonzero(t) == 0
        if p.endswith(".a"):  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / t.shape[1] ** 0.5
            assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
    # adapt() draws the factors exactly as pmodel.init does (same keyed path)
    lp = L.adapt(lm, pmodel.init(L.base_model(lm), seed=5), seed=0)
    for (p1, t1), (p2, t2) in zip(tree.paths(params), tree.paths(lp)):
        assert p1 == p2
        if p1.endswith((".a", ".b")):
            assert torch.equal(t1, t2), p1


def test_adapter_outputs_equal_merged_and_reference_formula():
    model, params, lm, lp = _setup(qkv_bias=True)
    lp = _randomise_b(lp)
    toks = _batch()["tokens"]
    with torch.no_grad():
        got = lm.apply(lp, toks)
        merged = model.apply(L.merge(lp), toks)
        assert not torch.allclose(got, model.apply(params, toks), atol=1e-3)  # adapters matter
    torch.testing.assert_close(got, merged, atol=1e-5, rtol=1e-5)
    # one leaf against the written-out formula x W^T + b + s (x A^T) B^T
    n = lp["layers"][0]["attn"]["q_proj"]["weight"]
    bias = lp["layers"][0]["attn"]["q_proj"]["bias"]
    x = torch.randn(3, 5, n.shape[1])
    ref = x @ n.base.T + bias + n.scale * (x @ n.a.T) @ n.b.T
    torch.testing.assert_close(pmodel.ops.linear(x, n, bias), ref, atol=1e-6, rtol=1e-6)


def _merged_loss_grads(model, lp, batch):
    """Adapter grads through the merged weight W + s B A built by autograd (the reference)."""
    def go(n):
        if not L.is_lora(n):
            return n
        return n.base + n.scale * (n.b @ n.a)
    loss, _ = model.loss(tree.map(go, lp, is_leaf=L.is_lora), batch)
    facs = L.adapter_params(lp)
    return loss, dict(zip(facs, torch.autograd.grad(loss, list(facs.values()))))


def test_adapter_gradients_equal_merged_weight_reference():
    model, _, lm, lp = _setup(qkv_bias=True)
    lp = _randomise_b(lp)
    batch = _batch()
    ref_loss, ref = _merged_loss_grads(model, lp, batch)
    loss, _ = lm.loss(lp, batch)
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for k, t in L.adapter_params(lp).items():
        torch.testing.assert_close(t.grad, ref[k], atol=1e-6, rtol=1e-5, msg=k)
    # frozen leaves: no gradient computed at all
    for p, t in tree.paths(lp):
        if not p.endswith((".a", ".b")):
            assert t.grad is None and not t.requires_grad, p


def test_training_steps_touch_only_adapters():
    _, _, lm, lp = _setup()
    before = {p: t.detach().clone() for p, t in tree.paths(lp)}
    trainable = [t for t in tree.leaves(lp) if t.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = _batch()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss, _ = lm.loss(lp, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state_ids = {id(p) for p in opt.state}
    for p, t in tree.paths(lp):
        if p.endswith((".a", ".b")):
            assert id(t) in state_ids, p
            if p.endswith(".b"):
                assert not torch.equal(t, before[p]), p
        else:
            assert id(t) not in state_ids, p
            assert torch.equal(t, before[p]), p  # bitwise unchanged


def test_merge_unmerge_round_trip_and_base_model():
    model, params, lm, lp = _setup()
    lp = _randomise_b(lp)
    merged = L.merge(lp)
    assert all(isinstance(t, torch.Tensor) for t in tree.leaves(merged))
    back = L.unmerge(merged, lp)
    for (p, t), (_, u) in zip(tree.paths(back), tree.paths(lp)):
        torch.testing.assert_close(t, u, atol=1e-7, rtol=0, msg=p)
    bm = L.base_model(lm)
    assert "lora" not in bm.transforms
    assert tree.structure(pmodel.abstract(bm)) == tree.structure(params)
    # merge is computed in fp32 and cast back: a bf16 copy merges to the rounded fp32 merge
    lp16 = tree.map(lambda t: t.detach().to(torch.bfloat16), lp)
    m16 = L.merge(lp16)
    n16 = lp16["layers"][1]["mlp"]["down_proj"]["weight"]
    ref = (n16.base.float() + n16.scale * n16.b.float() @ n16.a.float()).to(torch.bfloat16)
    assert torch.equal(m16["layers"][1]["mlp"]["down_proj"]["weight"], ref)


def test_targets():
    model = pmodel.families.preset("debug", num_layers=2)
    mods = lambda t: [m.split(".", 2)[2] for m in L.resolve_targets(model.defs, t)]  # noqa: E731
    assert mods(("q_proj", "v_proj")) == ["attn.q_proj", "attn.v_proj"] * 2
    assert mods("query_key_value,dense") == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"] * 2
    assert mods(["dense_h_to_4h", "dense_4h_to_h"]) == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] * 2
    assert len(mods("all")) == 14
    assert L.resolve_targets(model.defs, r"layers\.1\.mlp\..*") == [
        "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="matches no linear module"):
        L.resolve_targets(model.defs, r"lm_head")
    with pytest.raises(ValueError, match="unknown LoRA target"):
        L.resolve_targets(model.defs, ["q_proj", "qkv"])
    gelu = pmodel.families.preset("debug", activation="gelu")
    with pytest.raises(ValueError, match="does not exist"):
        L.resolve_targets(gelu.defs, ["gate_proj"])
    assert [m.rsplit(".", 1)[1] for m in L.resolve_targets(gelu.defs, ["dense_h_to_4h"])] == ["up_proj"] * 2
    lm = L.lora(model, 2, 4, targets="q_proj")
    with pytest.raises(ValueError, match="already carries"):
        L.lora(lm, 2, 4, targets="q_proj")
    for bad in (dict(rank=0, alpha=1), dict(rank=2, alpha=1, dropout=1.0), dict(rank=2, alpha=0)):
        with pytest.raises(ValueError):
            L.lora(model, **bad)
    spec = L.spec_of(L.lora(model, 4, 16, 0.1, ["q_proj", "down_proj"]))
    assert (spec.rank, spec.alpha, spec.dropout, spec.names) == (4, 16.0, 0.1, ("down_proj", "q_proj"))


def test_dropout_is_explicit_and_deterministic():
    _, _, lm, lp = _setup(dropout=0.25, targets=("q_proj",))
    lp = _randomise_b(lp)
    batch = _batch()
    with pytest.raises(ValueError, match="bind_dropout"):
        lm.loss(lp, batch)
    with torch.no_grad():  # inference: dropout is the identity, no key needed
        plain = lm.apply(lp, batch["tokens"])
    torch.testing.assert_close(lm.apply(L.bind_dropout(lp, train=False), batch["tokens"]), plain,
                               atol=0, rtol=0)
    a1, _ = lm.loss(L.bind_dropout(lp, seed=7, step=0), batch)
    a2, _ = lm.loss(L.bind_dropout(lp, seed=7, step=0), batch)
    a3, _ = lm.loss(L.bind_dropout(lp, seed=7, step=1), batch)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    # the mask is the public dropout_mask of the bound key
    n = L.bind_dropout(lp, seed=7, step=0)["layers"][0]["attn"]["q_proj"]["weight"]
    x = torch.randn(2, 3, n.shape[1])
    keep = L.dropout_mask(n.key, x.shape, 0.25)
    ref = x @ n.base.T + n.scale * ((x * keep / 0.75) @ n.a.T) @ n.b.T
    torch.testing.assert_close(n.linear(x), ref, atol=1e-6, rtol=1e-6)
    assert 0.6 < keep.float().mean() < 0.9
    # the key is outside the tree structure: grads of bound params fit the unbound params' tree
    bound = L.bind_dropout(lp, seed=7, step=0)
    assert tree.structure(bound) == tree.structure(lp)
    assert tree.map(lambda t: t, bound)["layers"][0]["attn"]["q_proj"]["weight"].key is None


def test_adapter_params_round_trip():
    _, _, lm, lp = _setup()
    facs = L.adapter_params(_randomise_b(lp))
    back = L.load_adapter_params(lp, facs)
    assert all(torch.equal(facs[k], v) for k, v in L.adapter_params(back).items())
    with pytest.raises(KeyError, match="match no LoRA leaf"):
        L.load_adapter_params(lp, {**facs, "layers.9.attn.q_proj.weight.a": facs["layers.0.attn.q_proj.weight.a"]})


def test_pmodel_optimizer_keeps_state_only_for_adapters():
    from pmodel import optim
    from pmodel.autodiff import value_and_grad

    _, _, lm, lp = _setup()
    before = {p: t.detach().clone() for p, t in tree.paths(lp)}
    tx = optim.masked(optim.adamw(1e-2, weight_decay=0.1), optim.trainable_mask)
    state = tx.init(lp)
    [adam] = optim.find_states(state, optim.ScaleByAdamState)
    mu = dict(tree.paths(adam.mu, is_leaf=lambda x: x is None))
    assert sorted(p for p, m in mu.items() if m is not None) == sorted(L.adapter_params(lp))
    step = value_and_grad(lambda p, b: lm.loss(p, b)[0])
    batch = _batch()
    losses = []
    for _ in range(3):
        loss, grads = step(lp, batch)
        updates, state = tx.update(grads, state, lp)
        optim.apply_updates(lp, updates)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p, t in tree.paths(lp):
        if not p.endswith((".a", ".b")):
            assert torch.equal(t, before[p]), p


def test_recompute_composes_with_lora_and_dropout():
    from pmodel.remat import recompute

    _, _, lm, lp = _setup(dropout=0.1)
    lp = L.bind_dropout(_randomise_b(lp), seed=3, step=5)
    batch = _batch()
    facs = list(L.adapter_params(lp).values())
    ref_loss, _ = lm.loss(lp, batch)
    ref = torch.autograd.grad(ref_loss, facs)
    for rc in (recompute(lm, "full", "uniform", 1), recompute(lm, "selective")):
        loss, _ = rc.loss(lp, batch)
        got = torch.autograd.grad(loss, facs)
        assert torch.equal(loss, ref_loss)
        for g, r in zip(got, ref):  # same ops, same masks (keyed, not the global RNG)
            assert torch.equal(g, r)


def test_fp32_adapters_on_a_bf16_base():
    model = pmodel.families.preset("debug", num_layers=1, dtype=torch.bfloat16)
    params = pmodel.init(model, seed=0)
    lm = L.lora(model, 4, 8, targets="all", dtype=torch.float32)
    lp = _randomise_b(L.adapt(lm, params, seed=1))
    n = lp["layers"][0]["mlp"]["up_proj"]["weight"]
    assert n.base.dtype == torch.bfloat16 and n.a.dtype == n.b.dtype == torch.float32
    x = torch.randn(2, 3, n.shape[1]).to(torch.bfloat16)
    y = n.linear(x)
    ref = (x @ n.base.T) + ((x.float() @ n.a.T) * n.scale @ n.b.T).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    loss, _ = lm.loss(lp, _batch())
    loss.backward()
    assert n.b.grad is not None and n.b.grad.dtype == torch.float32


def test_init_of_lora_model_keeps_the_plain_base_values():
    import pmodel as _pm
    from pmodel import lora as _lora
    base = _pm.families.preset("debug")
    lm = _lora.lora(base, rank=4, alpha=8, targets=("q_proj", "down_proj"))
    plain, adapted = _pm.init(base, seed=5), _pm.init(lm, seed=5)
    for i in range(base.config.num_layers):
        assert torch.equal(adapted["layers"][i]["attn"]["q_proj"]["weight"].base,
                           plain["layers"][i]["attn"]["q_proj"]["weight"])
        assert torch.equal(adapted["layers"][i]["mlp"]["down_proj"]["weight"].base,
                           plain["layers"][i]["mlp"]["down_proj"]["weight"])
        assert torch.equal(adapted["layers"][i]["attn"]["k_proj"]["weight"],
                           plain["layers"][i]["attn"]["k_proj"]["weight"])
