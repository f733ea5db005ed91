"""Mixtral: pmodel's MoE decoder vs transformers' MixtralForCausalLM (fp32, tiny random configs).

Logits, loss with the router auxiliary loss as transformers computes it (``output_router_logits``,
``router_aux_loss_coef``), every gradient (compared in the on-disk per-expert layout), the on-disk
layout transformers 5 writes (per-expert ``w1/w2/w3`` keys although it fuses experts in memory),
export -> transformers reload with identical logits, and a bitwise save/load/save round trip.
"""
from __future__ import annotations

import json

import pytest
import torch

import pmodel
from pmodel import tree

transformers = pytest.importorskip("transformers")

V = 96
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, num_local_experts=4,
            num_experts_per_tok=2, router_aux_loss_coef=0.02, output_router_logits=True,
            attn_implementation="eager", sliding_window=None)
CONFIGS = {
    "top2-of-4": BASE,
    # a window shorter than the sequence, 3 of 5 experts, MHA, another coefficient
    "window-top3-of-5": {**BASE, "sliding_window": 6, "num_local_experts": 5, "num_experts_per_tok": 3,
                         "num_key_value_heads": 4, "router_aux_loss_coef": 0.1},
}


def _hf_model(kind):
    cfg = transformers.MixtralConfig(**CONFIGS[kind])
    torch.manual_seed(0)
    m = transformers.MixtralForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            if n.endswith("mlp.gate.weight"):  # a router with clear preferences
                p.normal_(0.0, 0.5)
    return m


@pytest.fixture(params=list(CONFIGS))
def pair(request, tmp_path):
    hf = _hf_model(request.param)
    hf.save_pretrained(tmp_path / "hf")
    model, params = pmodel.load_hf(tmp_path / "hf")
    return request.param, hf, model, params, tmp_path


def _shifted(ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def _hf_grads_on_disk(hf) -> dict:
    """transformers' in-memory gradients (fused gate_up_proj, ``mlp.``) in the on-disk layout."""
    out = {}
    F = hf.config.intermediate_size
    for n, p in hf.named_parameters():
        g = p.grad
        if ".mlp.experts.gate_up_proj" in n:
            stem = n.replace(".mlp.experts.gate_up_proj", ".block_sparse_moe.experts")
            for e in range(g.shape[0]):
                out[f"{stem}.{e}.w1.weight"], out[f"{stem}.{e}.w3.weight"] = g[e, :F], g[e, F:]
        elif ".mlp.experts.down_proj" in n:
            stem = n.replace(".mlp.experts.down_proj", ".block_sparse_moe.experts")
            for e in range(g.shape[0]):
                out[f"{stem}.{e}.w2.weight"] = g[e]
        else:
            out[n.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = g
    return out


def test_config_and_on_disk_layout(pair):
    from safetensors import safe_open
    kind, hf, model, params, tmp = pair
    c = model.config
    assert (c.num_experts, c.moe_top_k, c.moe_aux_loss_coeff) == (hf.config.num_local_experts,
                                                                   hf.config.num_experts_per_tok,
                                                                   hf.config.router_aux_loss_coef)
    assert c.sliding_window == hf.config.sliding_window and model.family == "mixtral"
    with safe_open(tmp / "hf" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    E = c.num_experts
    for i in range(c.num_layers):
        for e in range(E):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight" in keys
        assert f"model.layers.{i}.block_sparse_moe.gate.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)
    assert params["layers"][0]["mlp"]["experts"]["gate_proj"].shape == (E, 48, 64)


def test_logits_equal(pair):
    kind, hf, model, params, _ = pair
    ids = torch.randint(0, V, (2, 20))  # longer than the window of 6
    with torch.no_grad():
        want = hf(ids).logits
        got = model.apply(params, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_loss_aux_loss_and_every_gradient(pair):
    kind, hf, model, params, _ = pair
    ids = torch.randint(0, V, (2, 16))
    out = hf(ids, labels=ids)
    out.loss.backward()
    loss, aux = model.loss(params, {"tokens": ids, "labels": _shifted(ids)})
    loss.backward()
    torch.testing.assert_close(aux["moe_aux_loss"], out.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    assert float(aux["moe_aux_loss"]) > 1.0  # E * sum F P >= 1 for top-k (F sums to k)
    fam = pmodel.families.get("mixtral")
    decls = dict(tree.paths(model.defs, is_leaf=pmodel.params.is_decl))
    ours = fam.tensors.to_hf(model.config, {p: t.grad for p, t in tree.paths(params)}, decls)
    theirs = _hf_grads_on_disk(hf)
    assert ours.keys() == theirs.keys()
    for k, g in ours.items():
        torch.testing.assert_close(g, theirs[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # every expert of every layer received tokens (so every expert's gradient was compared)
    assert all(float(ours[k].abs().sum()) > 0 for k in ours)


def test_padded_batch_aux_loss_counts_only_real_tokens(pair):
    kind, hf, model, params, _ = pair
    T, pad = 12, 3
    ids = torch.randint(1, V, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[1, :pad] = 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    if hf.config.sliding_window is not None:
        T, pad = 6, 2  # HF measures the window in slots, pmodel in positions: equal within the window
        ids, am, pos = ids[:, :T], am[:, :T].clone(), None
        am[1, :pad] = 0
        am[1, pad:] = 1
        pos = (am.cumsum(1) - 1).clamp(min=0)
    labels = ids.masked_fill(am == 0, -100)
    labels[1, pad] = -100  # would be predicted from a padding position (whose output is arbitrary)
    with torch.no_grad():
        out = hf(ids, attention_mask=am, position_ids=pos, labels=labels)
        loss, aux = model.loss(params, {"tokens": ids, "labels": _shifted(labels), "attention_mask": am})
    torch.testing.assert_close(aux["moe_aux_loss"], out.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)


def test_export_reload_identical_logits(pair):
    kind, hf, model, params, tmp = pair
    pmodel.save_hf(model, params, tmp / "out")
    re = transformers.MixtralForCausalLM.from_pretrained(tmp / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(re(ids).logits, hf(ids).logits, rtol=0, atol=0)
    cfg = json.loads((tmp / "out" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["output_router_logits"] is True
    assert re.config.router_aux_loss_coef == hf.config.router_aux_loss_coef


def test_load_save_round_trip_bitwise(pair, tmp_path):
    from safetensors.torch import load_file
    kind, hf, model, params, tmp = pair
    pmodel.save_hf(model, params, tmp_path / "a")
    m2, p2 = pmodel.load_hf(tmp_path / "a")
    pmodel.save_hf(m2, p2, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    orig = load_file(tmp / "hf" / "model.safetensors")
    assert a.keys() == b.keys() == orig.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], orig[k]), k
    assert m2.config == model.config


def test_export_refuses_what_mixtral_cannot_express():
    model = pmodel.families.preset("mixtral-8x7b", num_layers=1)
    fam = pmodel.families.get("mixtral")
    for kw in ({"moe_capacity_factor": 1.0}, {"moe_z_loss_coeff": 1e-3}, {"moe_shared_expert_ffn": 8},
               {"moe_aux_loss_type": "per_layer"}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            fam.config_to_hf(model.config.replace(**kw))


def test_presets_published_sizes():
    m = pmodel.families.preset("mixtral-8x7b")
    c = m.config
    assert (c.num_experts, c.moe_top_k, c.sliding_window, c.rope_theta) == (8, 2, None, 1e6)
    assert round(c.num_params() / 1e9, 1) == 46.7  # "46.7B total parameters" (Mixtral of Experts, 2024)
    assert round(pmodel.families.preset("mixtral-8x22b").config.num_params() / 1e9) == 141
