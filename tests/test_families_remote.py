"""pmodel vs the official remote modeling code (../shared/data/reference_code) on tiny random
configs, fp32: InternLM, Baichuan 7B (RoPE) / 13B (ALiBi), Baichuan2 13B (ALiBi + NormHead),
Qwen (v1), Aquila2 (GQA, LLaMA layout) and ChatGLM3. Table-driven: each row is a reference class, its config and the
checkpoint config.json; every test runs on every row.

Checked: logits (and on a left-padded batch), loss and every gradient within 1e-5, export ->
reference reload with identical logits, load -> save bitwise. The references run as shipped
(a test-side shim only restores transformers 4.x APIs they call, see ``_remote_code``).
"""
from __future__ import annotations

import inspect

import pytest
import torch

import pmodel
from pmodel import tree

pytest.importorskip("transformers")
import _remote_code as R  # noqa: E402  (after the importorskip)

V = 96
_LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4)
_QWEN = dict(vocab_size=V, hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
             kv_channels=16, seq_length=64, max_position_embeddings=64, use_flash_attn=False, no_bias=True,
             use_dynamic_ntk=True, use_logn_attn=True, rotary_pct=1.0, rotary_emb_base=10000,
             layer_norm_epsilon=1e-6, scale_attn_weights=True)
_GLM = dict(padded_vocab_size=V, hidden_size=64, ffn_hidden_size=112, num_layers=2, num_attention_heads=4,
            kv_channels=16, multi_query_attention=True, multi_query_group_num=2, seq_length=128,
            add_qkv_bias=True, add_bias_linear=False, rmsnorm=True, layernorm_epsilon=1e-5,
            post_layer_norm=True, apply_residual_connection_post_layernorm=False, original_rope=True,
            hidden_dropout=0.0, attention_dropout=0.0)

# name -> (reference folder, class, config.json keys, train-mode gradients?)
TABLE = {
    "internlm": ("internlm", "InternLMForCausalLM", {**_LLAMA, "max_position_embeddings": 128, "bias": True,
                                                     "model_type": "internlm"}, True),
    "internlm-nobias": ("internlm", "InternLMForCausalLM", {**_LLAMA, "max_position_embeddings": 128,
                                                            "bias": False, "model_type": "internlm"}, True),
    # Baichuan-7B's training branch needs xformers: gradients are taken through its eval branch.
    "baichuan-7b": ("baichuan_7b_v1", "BaiChuanForCausalLM", {**_LLAMA, "max_position_embeddings": 128,
                    "model_type": "baichuan", "position_embedding_type": "rope"}, False),
    "baichuan-13b": ("baichuan_13b_v1", "BaichuanForCausalLM", {**_LLAMA, "model_max_length": 128,
                     "model_type": "baichuan"}, True),
    "baichuan-13b-6heads": ("baichuan_13b_v1", "BaichuanForCausalLM", {**_LLAMA, "hidden_size": 48,
                            "num_attention_heads": 6, "model_max_length": 128, "model_type": "baichuan"}, True),
    "baichuan2-13b": ("baichuan2_13b", "BaichuanForCausalLM", {**_LLAMA, "model_max_length": 128,
                      "model_type": "baichuan", "norm_head": True}, True),
    "qwen": ("qwen", "QWenLMHeadModel", {**_QWEN, "model_type": "qwen"}, True),
    "qwen-partial-rotary": ("qwen", "QWenLMHeadModel", {**_QWEN, "rotary_pct": 0.5, "no_bias": False,
                                                        "rotary_emb_base": 500, "model_type": "qwen"}, True),
    "aquila2": ("aquila2", "AquilaForCausalLM", {**_LLAMA, "num_key_value_heads": 2, "max_position_embeddings": 128,
                                                 "model_type": "aquila"}, True),
    "chatglm3": ("chatglm3", "ChatGLMForConditionalGeneration", {**_GLM, "model_type": "chatglm"}, True),
    "chatglm3-mqa": ("chatglm3", "ChatGLMForConditionalGeneration", {**_GLM, "multi_query_group_num": 1,
                                                                     "model_type": "chatglm"}, True),
}
# Config keys the transformers 5 PretrainedConfig no longer stores from kwargs; set as attributes.
_ATTRS = {"max_length": 128, "original_rope": True, "use_cache": False}


def reference(kind: str, seed: int = 0):
    folder, cls_name, keys, _ = TABLE[kind]
    cls = getattr(R.load(folder), cls_name)
    kw = {k: v for k, v in keys.items() if k not in ("model_type", "position_embedding_type", "norm_head")}
    cfg = cls.config_class(**kw)
    for k, v in _ATTRS.items():
        if not hasattr(cfg, k):
            object.__setattr__(cfg, k, v)
    rs = getattr(cfg, "rope_scaling", None)
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default":
        # transformers 5 turns rope_scaling=None into {"rope_type": "default", ...}; the 4.x code
        # (Aquila2) reads None as "no scaling" and any dict as a scaling spec with a "type".
        object.__setattr__(cfg, "rope_scaling", None)
    torch.manual_seed(seed)
    return R.perturb(cls(cfg), seed)


@pytest.fixture(params=list(TABLE))
def pair(request, tmp_path):
    kind = request.param
    ref = reference(kind)
    R.write_checkpoint(ref, TABLE[kind][2], tmp_path / "hf")
    model, params = pmodel.load_hf(tmp_path / "hf")
    return kind, ref, model, params, tmp_path


def _fwd(ref, ids, **kw):
    sig = inspect.signature(ref.forward).parameters
    kw = {k: v for k, v in kw.items() if k in sig}
    if "use_cache" in sig:
        kw["use_cache"] = False
    return ref(input_ids=ids, **kw)


def _shifted(ids):
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def test_logits_equal(pair):
    kind, ref, model, params, _ = pair
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        want = _fwd(ref.eval(), ids).logits
        got = model.apply(params, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_left_padded_batch(pair):
    kind, ref, model, params, _ = pair
    T, pad = 12, 3
    ids = torch.randint(1, V, (2, T))
    am = torch.ones(2, T, dtype=torch.long)
    am[1, :pad] = 0
    ids[1, :pad] = 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = _fwd(ref.eval(), ids, attention_mask=am, position_ids=pos).logits
        got = model.apply(params, ids, attention_mask=am)
        alone = model.apply(params, ids[1:, pad:])
    valid = am.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, pad:], alone[0], rtol=1e-5, atol=1e-5)


def test_loss_and_every_gradient(pair):
    kind, ref, model, params, _ = pair
    ref.train(TABLE[kind][3])
    # Token 0 avoided: several references build nn.Embedding(padding_idx=pad_token_id=0), which
    # never updates that row; pmodel (like Megatron) trains every row.
    ids = torch.randint(1, V, (2, 16))
    out = _fwd(ref, ids, labels=ids)
    out.loss.backward()
    loss, aux = model.loss(params, {"tokens": ids, "labels": _shifted(ids)})
    loss.backward()
    torch.testing.assert_close(loss, out.loss.float(), rtol=1e-5, atol=1e-6)
    fam = pmodel.families.get(model.family)
    decls = dict(tree.paths(model.defs, is_leaf=pmodel.params.is_decl))
    ours = fam.tensors.to_hf(model.config, {p: t.grad for p, t in tree.paths(params)}, decls)
    theirs = {n: p.grad for n, p in ref.named_parameters()}
    assert ours.keys() == theirs.keys()
    for k, g in ours.items():
        torch.testing.assert_close(g, theirs[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert aux["num_tokens"] == 2 * 15


def test_export_reload_identical_logits(pair):
    kind, ref, model, params, tmp = pair
    pmodel.save_hf(model, params, tmp / "out")
    fresh = reference(kind, seed=1)
    res = R.load_state(fresh, tmp / "out")
    buffers = {n for n, _ in fresh.named_buffers()}
    assert not res["unexpected"] and set(res["missing"]) <= buffers, res
    ids = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(_fwd(fresh.eval(), ids).logits, _fwd(ref.eval(), ids).logits, rtol=0, atol=0)
    fam2, cfg2 = pmodel.families.config_from_hf(tmp / "out")
    assert fam2.name == model.family and cfg2 == model.config


def test_load_save_round_trip_bitwise(pair, tmp_path):
    from safetensors.torch import load_file
    kind, ref, model, params, tmp = pair
    pmodel.save_hf(model, params, tmp_path / "a")
    m2, p2 = pmodel.load_hf(tmp_path / "a")
    pmodel.save_hf(m2, p2, tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    orig = load_file(tmp / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and a.keys() <= orig.keys()
    assert all(k.endswith(pmodel.families.get(model.family).ignore_hf_keys) for k in orig.keys() - a.keys())
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], orig[k]), k
    assert m2.config == model.config


def test_qwen_refuses_positions_past_seq_length(tmp_path):
    ref = reference("qwen")
    R.write_checkpoint(ref, TABLE["qwen"][2], tmp_path)
    model, params = pmodel.load_hf(tmp_path)
    assert model.config.position_limit == 64
    with pytest.raises(ValueError, match="position_limit=64.*dynamic NTK"):
        model.apply(params, torch.zeros(1, 65, dtype=torch.long))
