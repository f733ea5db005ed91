"""PEFT adapters on fused / transposed checkpoint modules, against ``peft`` on the reference model.

A PEFT adapter on a fused module (Bloom's per-head-interleaved ``query_key_value``, GPT-2's
``Conv1D`` ``c_attn`` with ``fan_in_fan_out``, Baichuan's ``W_pack``, Qwen's ``c_attn``,
ChatGLM3's ``query_key_value`` and ``dense_h_to_4h``) has one ``A`` and a stacked ``B``. Loading
one that ``peft`` made gives the same logits in pmodel; saving writes that layout back
bit for bit, and ``peft`` loads pmodel's file with the same logits.
"""
from __future__ import annotations

import pytest
import torch

import pmodel
from pmodel import lora as L
from pmodel.checkpoint import peft as P

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import _remote_code as R  # noqa: E402
import test_families_remote as FR  # noqa: E402
import test_hf_parity as HP  # noqa: E402

# name -> (builder of the reference base model, how to write its checkpoint, PEFT targets)
TABLE = {
    "bloom": ("hf", "bloom", ["query_key_value", "dense_4h_to_h"]),
    "gpt2": ("hf", "gpt2", ["c_attn", "c_proj"]),
    "baichuan-13b": ("remote", "baichuan-13b", ["W_pack", "o_proj"]),
    "qwen": ("remote", "qwen", ["c_attn", "w1"]),
    "chatglm3": ("remote", "chatglm3", ["query_key_value", "dense_h_to_4h"]),
}


def _base(kind, tmp, seed=0):
    src, row, _ = TABLE[kind]
    if src == "hf":
        m = HP._hf_model(row)
        m.save_pretrained(tmp)
        return m
    m = FR.reference(row, seed)
    R.write_checkpoint(m, FR.TABLE[row][2], tmp)
    return m


def _logits(m, ids):
    with torch.no_grad():
        out = FR._fwd(m.eval(), ids)
    return out[0] if isinstance(out, tuple) else out.logits  # some references return tuples via peft


@pytest.mark.parametrize("kind", list(TABLE))
def test_peft_fused_adapter_round_trip(kind, tmp_path):
    from safetensors.torch import load_file
    base = _base(kind, tmp_path / "base")
    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TABLE[kind][2], lora_dropout=0.0,
                          init_lora_weights=False)
    pm = peft.get_peft_model(base, cfg)
    ids = torch.randint(1, HP.V, (2, 12))
    want = _logits(pm, ids)
    pm.save_pretrained(tmp_path / "peft")

    model, params = pmodel.load_hf(tmp_path / "base")
    with torch.no_grad():
        assert (want - model.apply(params, ids)).abs().max() > 1e-3  # the adapter really changes the output
    lm, lp = P.load_adapter(model, params, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(lm.apply(lp, ids), want, rtol=1e-5, atol=1e-5)

    P.save_adapter(lm, lp, tmp_path / "ours")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k

    fresh = _base(kind, tmp_path / "base2")  # same seed: the same base weights
    pm2 = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours")
    torch.testing.assert_close(_logits(pm2, ids), want, rtol=0, atol=0)


def test_separately_trained_fused_parts_are_refused(tmp_path):
    _base("baichuan-13b", tmp_path)
    model, params = pmodel.load_hf(tmp_path)
    lm = L.lora(model, 2, 4, targets="query_key_value")
    lp = L.adapt(lm, params, seed=0)  # q, k, v draw different A factors
    with pytest.raises(ValueError, match=r"W_pack.*A factors.*differ"):
        P.save_adapter(lm, lp, tmp_path / "out")
    lm = L.lora(model, 2, 4, targets="q_proj,v_proj")
    lp = L.adapt(lm, params, seed=0)
    with pytest.raises(ValueError, match=r"W_pack.*\['model|k_proj.*carry no LoRA"):
        P.save_adapter(lm, lp, tmp_path / "out2")
