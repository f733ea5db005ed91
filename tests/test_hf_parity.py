"""pmodel vs Hugging Face transformers on tiny random configs (offline), fp32."""
from __future__ import annotations

import json

import pytest
import torch

import pmodel
from pmodel import tree

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, attn_implementation="eager")


def _hf_model(kind: str, **kw):
    if kind == "llama":
        cfg = transformers.LlamaConfig(**{**TINY, **kw})
        cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**{**TINY, "sliding_window": 8, **kw})
        cls = transformers.MistralForCausalLM
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**TINY, "use_sliding_window": False, **kw})
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    m = cls(cfg).float().eval()
    with torch.no_grad():  # make norms and biases non-trivial so the mapping is really tested
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(params=["llama", "mistral", "qwen2", "llama-tied"])
def pair(request, tmp_path):
    kind = request.param
    hf = _hf_model("llama", tie_word_embeddings=True) if kind == "llama-tied" else _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    model, params = pmodel.load_hf(tmp_path / "hf")
    return kind, hf, model, params, tmp_path


def _shifted(ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def test_logits_equal(pair):
    kind, hf, model, params, _ = pair
    T = 20  # longer than mistral's window of 8
    ids = torch.randint(0, 96, (2, T))
    with torch.no_grad():
        want = hf(ids).logits
        got = model.apply(params, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if kind == "mistral":
        assert model.config.sliding_window == 8


def test_left_padded_batch(pair):
    kind, hf, model, params, _ = pair
    # HF measures Mistral's window in cache slots, pmodel in positions (so a left-padded row
    # equals the same prompt run alone); they agree while the sequence fits in the window.
    T, pad = (8, 3) if kind == "mistral" else (12, 3)
    ids = torch.randint(1, 96, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[1, :pad] = 0
    ids[1, :pad] = 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = hf(ids, attention_mask=am, position_ids=pos).logits
        got = model.apply(params, ids, attention_mask=am)
        alone = model.apply(params, ids[1:, pad:])
    valid = am.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    # the padded row equals the same prompt run alone
    torch.testing.assert_close(got[1, pad:], alone[0], rtol=1e-5, atol=1e-5)


def test_loss_and_every_gradient(pair):
    kind, hf, model, params, _ = pair
    ids = torch.randint(0, 96, (2, 16))
    out = hf(ids, labels=ids)
    out.loss.backward()
    loss, aux = model.loss(params, {"tokens": ids, "labels": _shifted(ids)})
    loss.backward()
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    fam = pmodel.families.get(model.family)
    hf_params = dict(hf.named_parameters())
    checked = 0
    for path, p in tree.paths(params):
        g_hf = hf_params[fam.hf_key(path)].grad
        torch.testing.assert_close(p.grad, g_hf, rtol=1e-5, atol=1e-6, msg=lambda m: f"{path}: {m}")
        checked += 1
    assert checked == len(tree.leaves(params)) and aux["num_tokens"] == 2 * 15


def test_export_reload_identical_logits(pair):
    kind, hf, model, params, tmp = pair
    pmodel.save_hf(model, params, tmp / "out")
    cls = type(hf)
    re = cls.from_pretrained(tmp / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(re(ids).logits, hf(ids).logits, rtol=0, atol=0)
    cfg = json.loads((tmp / "out" / "config.json").read_text())
    assert cfg["model_type"] == hf.config.model_type


def test_load_save_round_trip_bitwise(pair, tmp_path):
    from safetensors.torch import load_file
    kind, hf, model, params, tmp = pair
    pmodel.save_hf(model, params, tmp_path / "a")
    m2, p2 = pmodel.load_hf(tmp_path / "a")
    pmodel.save_hf(m2, p2, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    orig = load_file(tmp / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], orig[k]), k
    assert m2.config == model.config


def test_sharded_checkpoint_round_trip(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model, params = pmodel.load_hf(tmp_path / "hf")
    pmodel.save_hf(model, params, tmp_path / "out", max_shard_bytes=50_000)
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    re = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(re(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_generate_matches_hf_greedy(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    model, params = pmodel.load_hf(tmp_path / "hf")
    prompt = torch.randint(0, 96, (1, 5))
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = pmodel.generate(model, params, prompt, max_new_tokens=12)
    assert got.tolist() == want.tolist()


def test_load_errors_name_the_problem(tmp_path):
    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight.*shape"):
        pmodel.load_hf(tmp_path / "hf")
    cfg["model_type"] = "unknown_arch"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported HF model_type 'unknown_arch'"):
        pmodel.load_hf(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="config.json"):
        pmodel.load_hf(tmp_path / "nothing")
