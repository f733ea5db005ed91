"""LoRA targets given as the family's own Hugging Face module names (``W_pack``, ``c_attn``,
``query_key_value``, ``dense_h_to_4h``, ``w1``, ``c_proj``, ``self_attention.dense``, ...) resolve
through the family's tensor layout to exactly the pmodel projections that ``peft`` wraps on the
reference model with the same ``target_modules``.
"""
from __future__ import annotations

import pytest

import pmodel
from pmodel import families
from pmodel import lora as L

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import test_families_peft as FP  # noqa: E402  (reference builders, tiny configs)

# peft-table row -> target lists (PEFT list semantics: a module name or a dotted suffix)
TARGETS = {
    "bloom": [["query_key_value"], ["dense"], ["dense_h_to_4h", "dense_4h_to_h"], ["self_attention.dense"]],
    "gpt2": [["c_attn"], ["c_proj"], ["mlp.c_proj", "c_fc"], ["attn.c_proj"]],
    "baichuan-13b": [["W_pack"], ["W_pack", "o_proj", "gate_proj"], ["down_proj", "up_proj"]],
    "qwen": [["c_attn"], ["w1"], ["w2"], ["c_proj"], ["mlp.c_proj", "attn.c_attn"]],
    "chatglm3": [["query_key_value"], ["dense_h_to_4h"], ["dense"], ["dense_4h_to_h", "self_attention.dense"]],
}


def _peft_wrapped(base, targets, family) -> list[str]:
    """pmodel module paths held by the modules peft wraps for ``targets``."""
    import copy
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    layout = families.get(family).tensors
    out = []
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and len(getattr(mod, "lora_A")):
            key = name.removeprefix("base_model.model.")
            out += layout.module_parts(key)
    return sorted(out)


@pytest.mark.parametrize("kind", list(TARGETS))
def test_hf_names_resolve_like_peft(kind, tmp_path):
    base = FP._base(kind, tmp_path / "base")
    model, _ = pmodel.load_hf(tmp_path / "base")
    for targets in TARGETS[kind]:
        ours = sorted(L.resolve_targets(model.defs, targets, family=model.family))
        assert ours == _peft_wrapped(base, targets, model.family), (kind, targets)
        assert sorted(L.resolve_targets(model.defs, ",".join(targets), family=model.family)) == ours
        # the transform resolves through the model's family
        lm = L.lora(model, rank=2, alpha=4.0, targets=targets)
        wrapped = sorted(p.removesuffix(".weight") for p, d in pmodel.tree.paths(lm.defs, is_leaf=L.is_lora)
                         if L.is_lora(d))
        assert wrapped == ours, (kind, targets)


def test_fused_names_select_every_part():
    cfg = dict(num_layers=2)
    glm = pmodel.families.preset("chatglm3-6b", **cfg)
    got = L.resolve_targets(glm.defs, ["query_key_value", "dense_h_to_4h"], family="chatglm")
    assert [m.rsplit(".", 1)[1] for m in got[:5]] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    bc = pmodel.families.preset("baichuan2-7b", **cfg)
    assert [m.rsplit(".", 1)[1] for m in L.resolve_targets(bc.defs, "W_pack", family="baichuan")] == [
        "q_proj", "k_proj", "v_proj"] * 2
    qw = pmodel.families.preset("qwen-7b", **cfg)
    assert [m.rsplit(".", 1)[1] for m in L.resolve_targets(qw.defs, ["w2"], family="qwen")] == ["gate_proj"] * 2


def test_unknown_name_lists_the_family_names():
    llama = pmodel.families.preset("debug")
    with pytest.raises(ValueError, match=r"unknown LoRA target 'W_pack'.*llama checkpoint module names"):
        L.resolve_targets(llama.defs, ["W_pack"], family="llama")
    with pytest.raises(ValueError, match=r"unknown LoRA target 'W_pack'"):
        L.resolve_targets(llama.defs, ["W_pack"])  # no family: HF names are not known
