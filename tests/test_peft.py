"""pmodel LoRA vs Hugging Face transformers + PEFT on a tiny random Llama.

Same base weights (pmodel loads the HF checkpoint), same adapter weights (moved through the
PEFT file format in both directions): logits within 1e-5, adapter gradients within fp32
rounding, merged checkpoints loadable by transformers.
"""
from __future__ import annotations

import json

import pytest
import torch

import pmodel
from pmodel import lora as L
from pmodel.checkpoint import peft as P

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).float()
    d = tmp_path_factory.mktemp("hf_llama")
    m.save_pretrained(d, safe_serialization=True)
    return d


def _hf(hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def _tokens(B=2, T=16, vocab=256, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _peft_model(hf_dir, targets, r=4, alpha=8):
    torch.manual_seed(123)
    # init_lora_weights=False: B is random too, so the adapters change the outputs.
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    return peft.get_peft_model(_hf(hf_dir), cfg)


def _peft_grads(pm, tokens):
    out = pm(input_ids=tokens, labels=tokens)
    out.loss.backward()
    grads = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad
    return out.loss.detach(), out.logits.detach(), grads


def _pm_batch(tokens):
    labels = torch.full_like(tokens, -100)
    labels[:, :-1] = tokens[:, 1:]  # HF shifts inside the loss; pmodel takes shifted labels
    return {"tokens": tokens, "labels": labels}


@pytest.mark.parametrize("targets", [ALL7, ["q_proj", "v_proj"]])
def test_peft_adapter_loads_into_pmodel_with_identical_logits_and_grads(hf_dir, tmp_path, targets):
    pm = _peft_model(hf_dir, targets)
    tokens = _tokens()
    ref_loss, ref_logits, ref_grads = _peft_grads(pm, tokens)
    pm.save_pretrained(tmp_path)

    model, params = pmodel.load_hf(hf_dir)
    lm, lp = P.load_adapter(model, params, tmp_path)
    assert L.spec_of(lm).names == tuple(sorted(targets))
    with torch.no_grad():
        logits = lm.apply(lp, tokens)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)

    loss, _ = lm.loss(lp, _pm_batch(tokens))
    loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-6, rtol=1e-6)
    fam = pmodel.families.get(lm.family)
    n = 0
    for path, f in L.adapter_params(lp).items():
        weight_path, which = path.rsplit(".", 1)
        module = fam.hf_key(weight_path).removesuffix(".weight")
        name = f"base_model.model.{module}.lora_{which.upper()}.default.weight"
        torch.testing.assert_close(f.grad, ref_grads.pop(name), atol=1e-6, rtol=1e-4, msg=path)
        n += 1
    assert n == 2 * 2 * len(targets) and not ref_grads  # every PEFT trainable matched


def test_pmodel_adapter_loads_into_peft(hf_dir, tmp_path):
    model, params = pmodel.load_hf(hf_dir)
    lm = L.lora(model, 8, 16, targets="query_key_value,dense_4h_to_h")
    lp = L.adapt(lm, params, seed=4)
    g = torch.Generator().manual_seed(5)
    lp = L.load_adapter_params(lp, {k: torch.randn(v.shape, generator=g) * 0.05
                                    for k, v in L.adapter_params(lp).items()})
    P.save_adapter(lm, lp, tmp_path, base_model_name_or_path=str(hf_dir))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == [
        "down_proj", "k_proj", "q_proj", "v_proj"]

    pm = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path)
    tokens = _tokens(seed=2)
    with torch.no_grad():
        ref = pm(input_ids=tokens).logits
        got = lm.apply(lp, tokens)
        base = model.apply(params, tokens)
    assert (ref - base).abs().max() > 1e-3  # the adapter is really applied on the PEFT side
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)

    # round trip through our own reader gives the same factors
    lm2, lp2 = P.load_adapter(model, params, tmp_path)
    for k, v in L.adapter_params(lp2).items():
        assert torch.equal(v, L.adapter_params(lp)[k]), k

    # merged checkpoint: a plain HF model equal to the adapter model (and to PEFT's merge)
    out = pmodel.save_hf(L.base_model(lm), L.merge(lp), tmp_path / "merged")
    merged_hf = _hf(out)
    with torch.no_grad():
        torch.testing.assert_close(merged_hf(input_ids=tokens).logits, got, atol=1e-5, rtol=0)
        peft_merged = pm.merge_and_unload()
        for k, v in merged_hf.state_dict().items():
            torch.testing.assert_close(v, peft_merged.state_dict()[k], atol=1e-6, rtol=0, msg=k)


def test_partial_layer_targets_round_trip_through_peft(hf_dir, tmp_path):
    model, params = pmodel.load_hf(hf_dir)
    lm = L.lora(model, 2, 4, targets=r"layers\.1\.attn\.(q|o)_proj")
    lp = L.adapt(lm, params, seed=0)
    g = torch.Generator().manual_seed(9)
    lp = L.load_adapter_params(lp, {k: torch.randn(v.shape, generator=g) * 0.1
                                    for k, v in L.adapter_params(lp).items()})
    P.save_adapter(lm, lp, tmp_path)
    assert isinstance(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"], str)
    pm = peft.PeftModel.from_pretrained(_hf(hf_dir), tmp_path)
    adapted = sorted(n for n, _ in pm.named_modules() if n.endswith(("q_proj", "o_proj")) and hasattr(
        dict(pm.named_modules())[n], "lora_A"))
    assert adapted == ["base_model.model.model.layers.1.self_attn.o_proj",
                       "base_model.model.model.layers.1.self_attn.q_proj"]
    tokens = _tokens(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(lm.apply(lp, tokens), pm(input_ids=tokens).logits, atol=1e-5, rtol=0)


def test_unsupported_adapters_raise(hf_dir, tmp_path):
    model, params = pmodel.load_hf(hf_dir)
    pm = _peft_model(hf_dir, ["q_proj"])
    pm.save_pretrained(tmp_path)
    cfg_file = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        P.load_adapter(model, params, tmp_path)
    cfg_file.write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ValueError, match="rank_pattern"):
        P.load_adapter(model, params, tmp_path)
    cfg_file.write_text(json.dumps(cfg))
    lm, lp = P.load_adapter(model, params, tmp_path)
    with pytest.raises(ValueError, match="already has LoRA"):
        P.load_adapter(lm, lp, tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        P.load_adapter(model, params, tmp_path)
