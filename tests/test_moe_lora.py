"""LoRA on an MoE model (attention and stacked expert weights, one adapter per expert) and PEFT
adapter interop with transformers 5's fused Mixtral experts (``target_parameters``).

* pmodel's LoRA equals the reference ``W + scale * B A`` formed explicitly (loss and every
  adapter gradient, autograd through the merged weights), also for a pmodel-trained adapter with
  gate and up independent.
* A PEFT adapter on ``q_proj, v_proj`` + ``experts.gate_up_proj, experts.down_proj`` (random
  ``B``) loads into pmodel with the same logits and loss (with the router aux loss) and the same
  adapter gradients (in PEFT's layout) as ``peft.PeftModel``; pmodel writes it back tensor for
  tensor and PEFT loads pmodel's file with the same logits; attention-only and experts-only too.
"""
from __future__ import annotations

import pytest
import torch

import pmodel
from pmodel import lora as L, tree
from pmodel.model import ModelConfig, build

TOL = 1e-5


def _close(a, b, tol=TOL):
    a, b = a.detach().double(), b.detach().double()
    err = float((a - b).abs().max())
    scale = float(b.abs().max())
    return err <= tol * max(scale, 1e-30) + 1e-12, f"max diff {err:.3g} (max |b| {scale:.3g})"


CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=24,
                  num_experts=4, moe_top_k=2, moe_aux_loss_coeff=0.02, moe_z_loss_coeff=1e-3)


def _batch(seed=0, B=2, T=12, V=64):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, (B, T), generator=g)
    return {"tokens": t, "labels": torch.roll(t, -1, 1)}


def _randomise_b(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, n in tree.paths(params, is_leaf=L.is_lora):
        if L.is_lora(n):
            with torch.no_grad():
                n.b.copy_(torch.randn(n.b.shape, generator=g) * 0.05)


def test_targets_on_an_moe_model():
    m = build(CFG)
    mods = L.spec_of(L.lora(m, 4, 8, targets="all")).modules
    assert "layers.0.mlp.experts.gate_proj" in mods and "layers.1.mlp.experts.down_proj" in mods
    assert not any("router" in x for x in mods)  # the router stays a plain tensor
    assert L.spec_of(L.lora(m, 4, 8, targets="experts")).modules == tuple(
        f"layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj"))
    assert L.spec_of(L.lora(m, 4, 8, targets="q_proj,down_proj")).modules == (
        "layers.0.attn.q_proj", "layers.0.mlp.experts.down_proj", "layers.1.attn.q_proj",
        "layers.1.mlp.experts.down_proj")
    lm = L.lora(m, 4, 8, targets="experts")
    node = lm.defs["layers"][0]["mlp"]["experts"]["gate_proj"]
    assert node.a.shape == (4, 4, 32) and node.b.shape == (4, 24, 4) and node.base.shape == (4, 24, 32)
    with pytest.raises(ValueError, match="dropout"):
        L.lora(m, 4, 8, dropout=0.1, targets="experts")
    L.lora(m, 4, 8, dropout=0.1, targets="q_proj")  # attention-only dropout is fine


def test_expert_lora_equals_the_merged_reference():
    """Loss and every adapter gradient equal the base model run on W + scale * B A (formed
    explicitly, differentiable in A and B)."""
    m = build(CFG)
    lm = L.lora(m, rank=4, alpha=8, targets="all")
    lp = pmodel.init(lm, seed=0)
    _randomise_b(lp)
    batch = _batch()
    loss, aux = lm.loss(lp, batch)
    loss.backward()
    assert float(aux["moe_aux_loss"]) > 0
    # reference: plain params whose adapted weights are base + scale * b @ a (autograd to a, b)
    fa = {p: n.a.detach().clone().requires_grad_(True) for p, n in tree.paths(lp, is_leaf=L.is_lora) if L.is_lora(n)}
    fb = {p: n.b.detach().clone().requires_grad_(True) for p, n in tree.paths(lp, is_leaf=L.is_lora) if L.is_lora(n)}

    def merged(path, n):
        if not L.is_lora(n):
            return n.detach()
        return n.base.detach() + n.scale * (fb[path] @ fa[path])

    ref_params = tree.map_with_path(merged, lp, is_leaf=L.is_lora)
    ref, _ = L.base_model(lm).loss(ref_params, batch)
    ref.backward()
    ok, msg = _close(loss, ref)
    assert ok, f"loss: {msg}"
    n_expert = 0
    for p, n in tree.paths(lp, is_leaf=L.is_lora):
        if not L.is_lora(n):
            assert n.grad is None  # frozen, router included
            continue
        for name, got, want in (("a", n.a.grad, fa[p].grad), ("b", n.b.grad, fb[p].grad)):
            ok, msg = _close(got, want)
            assert ok, f"{p}.{name}: {msg}"
        n_expert += n.a.dim() == 3
    assert n_expert == 6
    # merge / unmerge round trip on the stacked weights
    mp = L.merge(lp)
    assert mp["layers"][0]["mlp"]["experts"]["up_proj"].shape == (4, 24, 32)
    ok, msg = _close(L.base_model(lm).loss(mp, batch)[0], ref)
    assert ok, msg
    back = L.unmerge(mp, lp)
    ok, msg = _close(back["layers"][1]["mlp"]["experts"]["down_proj"].base, lp["layers"][1]["mlp"]["experts"]["down_proj"].base)
    assert ok, msg


# ============================================================================ PEFT interop
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

HF = dict(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, num_local_experts=4,
          num_experts_per_tok=2, router_aux_loss_coef=0.02, output_router_logits=True, attn_implementation="eager")

VARIANTS = {
    "attention+experts": dict(target_modules=["q_proj", "v_proj"],
                              target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    "attention-only": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "experts-only": dict(target_modules=[], target_parameters=["experts.down_proj"]),
}


def _hf_peft(tmp_path, variant):
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**HF)).float()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)  # a router with clear preferences
    hf.save_pretrained(tmp_path / "base")
    lc = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **VARIANTS[variant])
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, lc)
    pm.save_pretrained(tmp_path / "adapter")
    return pm


def _peft_grads(pm) -> dict:
    return {n.replace(".default", "").removeprefix("base_model.model."): p.grad
            for n, p in pm.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_on_mixtral_experts(tmp_path, variant):
    from safetensors.torch import load_file
    from pmodel.checkpoint import peft as peft_io
    pm = _hf_peft(tmp_path, variant)
    model, params = pmodel.load_hf(tmp_path / "base")
    lm, lp = peft_io.load_adapter(model, params, tmp_path / "adapter")
    n_expert = sum(1 for m in L.spec_of(lm).modules if ".experts." in m)
    assert n_expert == {"attention+experts": 6, "attention-only": 0, "experts-only": 2}[variant]
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    # logits
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    got = lm.apply(lp, ids)
    ok, msg = _close(got, want)
    assert ok, f"logits: {msg}"
    assert not _close(model.apply(params, ids), want, 1e-3)[0]  # the adapter changes the function
    # loss (with the router aux loss, as transformers adds it) and adapter gradients
    out = pm(input_ids=ids, labels=ids)  # transformers shifts the labels itself
    out.loss.backward()
    loss, _ = lm.loss(lp, {"tokens": ids, "labels": labels})
    loss.backward()
    ok, msg = _close(loss, out.loss)
    assert ok, f"loss: {msg}"
    # pmodel's gradients in PEFT's layout: write them as an adapter (A of gate and up summed,
    # as PEFT's one A receives both parts' gradients)
    grads = {}
    for p, n in tree.paths(lp, is_leaf=L.is_lora):
        if L.is_lora(n):
            grads[p] = (n.a.grad, n.b.grad)
    for ex in [p for p in grads if p.endswith("experts.gate_proj")]:
        up = ex.replace("gate_proj", "up_proj")
        ga = grads[ex][0] + grads[up][0]
        grads[ex], grads[up] = (ga, grads[ex][1]), (ga, grads[up][1])
    gparams = L.load_adapter_params(lp, {f"{p}.{w}": t for p, (a, b) in grads.items() for w, t in (("a", a), ("b", b))})
    peft_io.save_adapter(lm, gparams, tmp_path / "grads")
    ours = {k.removeprefix("base_model.model."): v for k, v in load_file(tmp_path / "grads" / "adapter_model.safetensors").items()}
    theirs = {k.replace(".weight", ""): v for k, v in _peft_grads(pm).items()}
    ours = {k.replace(".weight", ""): v for k, v in ours.items()}
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        ok, msg = _close(ours[k], theirs[k])
        assert ok, f"grad {k}: {msg}"
    # save back: the same tensors as PEFT's file; PEFT loads pmodel's file with the same logits
    peft_io.save_adapter(lm, lp, tmp_path / "ours")
    a = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    hf2 = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base").float()
    pm2 = peft.PeftModel.from_pretrained(hf2, tmp_path / "ours").eval()
    with torch.no_grad():
        again = pm2(input_ids=ids).logits
    ok, msg = _close(again, want)
    assert ok, f"PEFT loading pmodel's adapter: {msg}"


def test_separately_trained_gate_and_up_are_refused(tmp_path):
    from pmodel.checkpoint import peft as peft_io
    model = build(CFG).replace(family="mixtral")
    lm = L.lora(model, 4, 8, targets="experts")
    lp = pmodel.init(lm, seed=0)  # gate and up draw independent A factors
    with pytest.raises(ValueError, match="gate_up_proj"):
        peft_io.save_adapter(lm, lp, tmp_path / "x")
    lm = L.lora(model, 4, 8, targets="gate_proj")
    with pytest.raises(ValueError, match="covers all of them"):
        peft_io.save_adapter(lm, pmodel.init(lm, seed=0), tmp_path / "y")
