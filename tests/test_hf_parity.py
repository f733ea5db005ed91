"""pmodel vs Hugging Face transformers on tiny random configs (offline), fp32."""
from __future__ import annotations

import inspect
import json

import pytest
import torch

import pmodel
from pmodel import tree

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-6, attn_implementation="eager")
V = 96  # every table row uses this vocabulary

# Table of families: name -> (config class, model class, config kwargs). Two tiny configs per
# family where it has a second shape worth testing (GQA / MQA, non-power-of-two heads, untied
# output layer, erf GeLU).
_GPT2 = dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
             attn_pdrop=0.0, attn_implementation="eager", bos_token_id=0, eos_token_id=0)
_BLOOM = dict(vocab_size=V, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
              attn_implementation="eager")
_GEMMA = dict(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6,
              attn_implementation="eager", pad_token_id=0, bos_token_id=1, eos_token_id=2)
TABLE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", TINY),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {**TINY, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**TINY, "sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**TINY, "use_sliding_window": False}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT2),
    "gpt2-erf-untied": ("GPT2Config", "GPT2LMHeadModel", {**_GPT2, "activation_function": "gelu",
                                                          "n_inner": 80, "tie_word_embeddings": False}),
    "bloom": ("BloomConfig", "BloomForCausalLM", _BLOOM),
    "bloom-6heads": ("BloomConfig", "BloomForCausalLM", {**_BLOOM, "hidden_size": 48, "n_head": 6}),
    "gemma-mqa": ("GemmaConfig", "GemmaForCausalLM", _GEMMA),
    "gemma-mha": ("GemmaConfig", "GemmaForCausalLM", {**_GEMMA, "num_key_value_heads": 4, "head_dim": 16}),
}


def _hf_model(kind: str, **kw):
    cfg_name, cls_name, base = TABLE[kind]
    cfg = getattr(transformers, cfg_name)(**{**base, **kw})
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    m = cls(cfg).float().eval()
    with torch.no_grad():  # make norms and biases non-trivial so the mapping is really tested
        for n, p in m.named_parameters():
            if "norm" in n or "ln" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(params=list(TABLE))
def pair(request, tmp_path):
    kind = request.param
    hf = _hf_model(kind)
    hf.save_pretrained(tmp_path / "hf")
    model, params = pmodel.load_hf(tmp_path / "hf")
    return kind, hf, model, params, tmp_path


def _takes_position_ids(hf) -> bool:
    return "position_ids" in inspect.signature(hf.forward).parameters


def _hf_grads_in_pmodel_layout(model, params, hf):
    """pmodel grads converted to checkpoint keys by the family's layout, with HF's grads."""
    fam = pmodel.families.get(model.family)
    decls = dict(tree.paths(model.defs, is_leaf=pmodel.params.is_decl))
    ours = fam.tensors.to_hf(model.config, {p: t.grad for p, t in tree.paths(params)}, decls)
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    return ours, theirs


def _shifted(ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def test_logits_equal(pair):
    kind, hf, model, params, _ = pair
    T = 20  # longer than mistral's window of 8
    ids = torch.randint(0, V, (2, T))
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
    kw = {"position_ids": pos} if _takes_position_ids(hf) else {}  # Bloom reads positions from the mask
    with torch.no_grad():
        want = hf(ids, attention_mask=am, **kw).logits
        got = model.apply(params, ids, attention_mask=am)
        alone = model.apply(params, ids[1:, pad:])
    valid = am.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    # the padded row equals the same prompt run alone
    torch.testing.assert_close(got[1, pad:], alone[0], rtol=1e-5, atol=1e-5)


def test_loss_and_every_gradient(pair):
    kind, hf, model, params, _ = pair
    ids = torch.randint(0, V, (2, 16))
    out = hf(ids, labels=ids)
    out.loss.backward()
    loss, aux = model.loss(params, {"tokens": ids, "labels": _shifted(ids)})
    loss.backward()
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    ours, theirs = _hf_grads_in_pmodel_layout(model, params, hf)
    assert ours.keys() == theirs.keys()
    checked = 0
    for k, g in ours.items():
        torch.testing.assert_close(g, theirs[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        checked += 1
    assert checked == len(theirs) and aux["num_tokens"] == 2 * 15


def test_export_reload_identical_logits(pair):
    kind, hf, model, params, tmp = pair
    pmodel.save_hf(model, params, tmp / "out")
    cls = type(hf)
    re = cls.from_pretrained(tmp / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, V, (1, 10))
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


def test_padded_vocab_exports_unpadded_rows(tmp_path):
    """A Megatron-padded vocabulary (GPT-3 preset) exports vocab_size rows that GPT2LMHeadModel
    loads with the same logits, and reloads padded again, bitwise."""
    model = pmodel.families.preset("gpt3-175b", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                                   head_dim=8, ffn_hidden_size=128, vocab_size=V - 5, pad_vocab_to=16,
                                   max_position_embeddings=64)
    params = pmodel.init(model, seed=0)
    assert params["embed"]["weight"].shape[0] == 96
    pmodel.save_hf(model, params, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.transformer.wte.weight.shape[0] == V - 5
    ids = torch.randint(0, V - 5, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.apply(params, ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    m2, p2 = pmodel.load_hf(tmp_path)
    assert m2.config == model.config
    w = p2["embed"]["weight"]
    assert torch.equal(w[: V - 5], params["embed"]["weight"][: V - 5]) and not w[V - 5:].any()
