"""Core: declarations, keyed init, abstract init, presets, configs, library rules."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pmodel
from pmodel import tree
from pmodel.model import ModelConfig, build
from pmodel.params import P

ROOT = Path(__file__).resolve().parents[1]


def test_declaration_validation():
    with pytest.raises(ValueError, match="differ in length"):
        P(shape=(2, 3), axes=("embed",))
    with pytest.raises(ValueError, match="unknown logical axis"):
        P(shape=(2,), axes=("bogus",))
    with pytest.raises(ValueError, match="num_heads 6 must be a multiple of num_kv_heads 4"):
        ModelConfig(vocab_size=10, hidden_size=12, num_layers=1, num_heads=6, num_kv_heads=4, ffn_hidden_size=8)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2, ffn_hidden_size=8, activation="relu")


def test_keyed_init_is_path_determined():
    m = pmodel.families.preset("debug")
    a, b = pmodel.init(m, seed=3), pmodel.init(m, seed=3)
    c = pmodel.init(m, seed=4)
    for (pa, x), (_, y), (_, z) in zip(tree.paths(a), tree.paths(b), tree.paths(c)):
        assert torch.equal(x, y), pa
        if "norm" not in pa:
            assert not torch.equal(x, z), pa
    # Dropping layers does not change the values of the layers that remain.
    short = pmodel.init(pmodel.families.preset("debug", num_layers=1), seed=3)
    assert torch.equal(short["layers"][0]["attn"]["q_proj"]["weight"], a["layers"][0]["attn"]["q_proj"]["weight"])
    # A shard hook sees the full draw, so a shard equals slicing the unsharded init.
    halves = pmodel.init(m, seed=3, shard=lambda path, d, t: t.chunk(2)[0] if d.axes[0] == "heads" else t)
    full = a["layers"][1]["attn"]["q_proj"]["weight"]
    assert torch.equal(halves["layers"][1]["attn"]["q_proj"]["weight"], full.chunk(2)[0])


def test_frozen_leaves_have_no_grad():
    m = pmodel.families.preset("debug")
    defs = tree.map(lambda d: d.replace(trainable=False) if d.axes == ("embed",) else d, m.defs,
                    is_leaf=pmodel.params.is_decl)
    p = pmodel.init(m.replace(defs=defs), seed=0)
    assert not p["final_norm"]["weight"].requires_grad and p["embed"]["weight"].requires_grad


@pytest.mark.parametrize("name", ["llama2-70b", "llama3-70b", "qwen1.5-72b", "yi-34b"])
def test_big_presets_abstract_init_on_meta(name):
    m = pmodel.families.preset(name)
    ab = pmodel.abstract(m)
    assert all(t.device.type == "meta" for t in tree.leaves(ab))
    n = sum(t.numel() for t in tree.leaves(ab))
    assert n == m.config.num_params()


def test_preset_parameter_counts_match_published_sizes():
    # Published totals (model cards): LLaMA2-7B 6.74B, 13B 13.0B, 70B 69.0B; LLaMA3-8B 8.03B;
    # Mistral-7B 7.24B; Qwen1.5-0.5B 0.46B (tied).
    want = {"llama2-7b": 6.74e9, "llama2-13b": 13.02e9, "llama2-70b": 68.98e9, "llama3-8b": 8.03e9,
            "mistral-7b": 7.24e9, "qwen1.5-0.5b": 0.464e9}
    for name, n in want.items():
        got = pmodel.families.preset(name).config.num_params()
        assert abs(got - n) / n < 0.005, (name, got)


def test_every_preset_builds_and_round_trips_hf_config():
    for name in pmodel.families.names():
        fam_name, cfg = pmodel.families.preset_config(name)
        fam = pmodel.families.get(fam_name)
        d = json.loads(json.dumps(fam.config_to_hf(cfg)))
        fam2, back = pmodel.families.config_from_hf(d)
        assert back == cfg, name


def test_config_from_hf_v4_and_v5_rope_styles():
    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    _, v4 = pmodel.families.config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": sc})
    _, v5 = pmodel.families.config_from_hf({**base, "rope_parameters": {**sc, "rope_theta": 5e5}})
    assert v4 == v5 and v4.rope_theta == 5e5 and v4.rope_scaling_dict == sc
    _, v4_type = pmodel.families.config_from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert v4_type.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}


def test_unknown_preset_lists_known_ones():
    with pytest.raises(KeyError, match="llama2-7b"):
        pmodel.families.preset("llama9")


def test_import_changes_no_torch_attribute():
    # Compare each namespace's own entries by identity; lazily imported submodules are not patches.
    code = r"""
import types
import torch, torch.nn, torch.nn.functional as F, torch.utils.checkpoint, torch.utils._pytree
mods = [torch, torch.nn, F, torch.Tensor, torch.nn.Module, torch.utils.checkpoint, torch.autograd.Function]
snap = lambda: [{k: v for k, v in vars(m).items() if not isinstance(v, types.ModuleType)} for m in mods]
before = snap()
import pmodel, pmodel.ops, pmodel.families, pmodel.checkpoint, pmodel.generation, pmodel.remat, pmodel.data, pmodel.parallel, pmodel.device
after = snap()
changed = [(mods[i].__name__, k) for i, (b, a) in enumerate(zip(before, after))
           for k in set(a) | set(b) if a.get(k, 0) is not b.get(k, 0)]
assert not changed, changed
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_padded_vocab_and_variants_run():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=48,
                      pad_vocab_to=16, norm="layer", position="alibi", activation="gelu",
                      embedding_norm=True, qkv_bias=True, o_bias=True, mlp_bias=True)
    m = build(cfg)
    p = pmodel.init(m, seed=0)
    assert p["embed"]["weight"].shape == (64, 32)
    t = torch.randint(0, 50, (2, 7))
    assert m.apply(p, t).shape == (2, 7, 50)
    cfg2 = cfg.replace(position="learned", activation="geglu", norm="rms", norm_offset=1.0,
                       embedding_scale=32 ** 0.5, embedding_norm=False, rotary_fraction=0.5)
    m2 = build(cfg2)
    p2 = pmodel.init(m2, seed=0)
    loss, _ = m2.loss(p2, {"tokens": t, "labels": t})
    loss.backward()
    assert torch.isfinite(loss)


def test_fused_and_unfused_loss_agree_and_policy_takes_effect():
    m = pmodel.families.preset("debug")
    p = pmodel.init(m, seed=0)
    t = torch.randint(0, 512, (2, 12))
    lab = torch.roll(t, -1, 1)
    lab[:, -1] = -100
    batch = {"tokens": t, "labels": lab, "loss_mask": (torch.rand(2, 12) > 0.3).float()}
    l1, a1 = m.loss(p, batch)
    g1 = torch.autograd.grad(l1, tree.leaves(p))
    unfused = m.replace(kernels=pmodel.ops.Kernels(fused_cross_entropy=False))
    l2, a2 = unfused.loss(p, batch)
    g2 = torch.autograd.grad(l2, tree.leaves(p))
    assert l2.grad_fn.name() != l1.grad_fn.name()  # a different code path really ran
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a1["per_token"], a2["per_token"], rtol=1e-5, atol=1e-6)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
