"""Every ``Kernels`` field changes which implementation runs; ``kernels_for`` refuses what a
backend does not have.

NPU: the CPU stand-ins (tests/npu_standins.py) count their calls, so each field is shown to call
its torch_npu op when on and not when off, with results equal to the reference. CUDA (no GPU
here): the dispatch choice is checked with ``ops.implementation`` without running it.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import pmodel
from pmodel import ops, tree
from pmodel.ops import cuda as C
from pmodel.ops import npu as N
from pmodel.ops import reference as R
from pmodel.ops.kernels import AVAILABLE, FUSED_FIELDS

if importlib.util.find_spec("torch_npu") is not None:
    pytest.skip("real torch_npu installed: stand-ins would shadow it", allow_module_level=True)

from npu_standins import CALLS, install  # noqa: E402

_LIB = install()
NPU = ops.Kernels(backend="npu")

# field -> (ops name, torch_npu op the NPU lowering calls)
FIELD_OPS = {"fused_norm": ("rms_norm", "npu_rms_norm"), "fused_swiglu": ("swiglu", "npu_swiglu"),
             "fused_rotary": ("rotary", "npu_rotary_mul"), "fused_attention": ("attention", "npu_fusion_attention")}


def _run(op: str, kernels):
    g = torch.Generator().manual_seed(0)
    if op == "rms_norm":
        x, w = torch.randn(2, 5, 16, generator=g), torch.randn(16, generator=g)
        return ops.rms_norm(x, w, 1e-6, kernels=kernels)
    if op == "swiglu":
        a, b = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
        return ops.swiglu(a, b, kernels=kernels)
    if op == "rotary":
        q = torch.randn(2, 6, 3, 16, generator=g)
        cos, sin = ops.rope_cos_sin(torch.arange(6).expand(2, 6), ops.rope_inv_freq(16, 1e4), torch.float32)
        return ops.rotary(q, cos, sin, kernels=kernels)
    q, k, v = torch.randn(2, 7, 4, 8, generator=g), torch.randn(2, 7, 2, 8, generator=g), torch.randn(2, 7, 2, 8, generator=g)
    return ops.attention(q, k, v, causal=True, kernels=kernels)


@pytest.mark.parametrize("field", list(FIELD_OPS))
def test_each_field_switches_the_npu_kernel(field):
    op, npu_op = FIELD_OPS[field]
    want = _run(op, None)  # reference backend
    CALLS.clear()
    on = _run(op, NPU)
    assert CALLS[npu_op] == 1, dict(CALLS)
    CALLS.clear()
    off = _run(op, NPU.replace(**{field: False}))
    assert CALLS[npu_op] == 0 and sum(CALLS.values()) == 0, dict(CALLS)
    torch.testing.assert_close(on, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(off, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field", list(FIELD_OPS))
def test_each_field_reaches_the_whole_model(field):
    """A field turned off in ``Model.kernels`` removes exactly its torch_npu op from a forward
    and backward on the NPU backend; logits, loss and gradients stay the reference ones."""
    m = pmodel.families.preset("debug")
    p = pmodel.init(m, seed=0)
    t = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = {"tokens": t, "labels": torch.roll(t, -1, 1)}
    l0, _ = m.loss(p, batch)
    g0 = torch.autograd.grad(l0, tree.leaves(p))
    counts = {}
    for on in (True, False):
        mk = m.replace(kernels=NPU.replace(**{field: on}))
        CALLS.clear()
        loss, _ = mk.loss(p, batch)
        grads = torch.autograd.grad(loss, tree.leaves(p))
        counts[on] = dict(CALLS)
        torch.testing.assert_close(loss, l0, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, g0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    npu_op = FIELD_OPS[field][1]
    assert counts[True].get(npu_op, 0) > 0, counts
    assert counts[False].get(npu_op, 0) == 0, counts
    others = {k: v for k, v in counts[True].items() if k != npu_op}
    assert others and {k: counts[False].get(k, 0) for k in others} == others, counts  # the rest unchanged


def test_fused_cross_entropy_field_selects_chunked_or_full_logits():
    m = pmodel.families.preset("debug")
    p = pmodel.init(m, seed=0)
    t = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    batch = {"tokens": t, "labels": torch.roll(t, -1, 1)}
    fused, _ = m.replace(kernels=NPU).loss(p, batch)
    plain, _ = m.replace(kernels=NPU.replace(fused_cross_entropy=False)).loss(p, batch)
    # The chunked kernel is one autograd node holding no logits; the plain path materialises the
    # full (B*T, V) logits and its graph reaches the cross-entropy backward.
    def names(fn, seen=None):
        seen = set() if seen is None else seen
        if fn is None or fn in seen:
            return set()
        seen.add(fn)
        out = {fn.name()}
        for nxt, _ in fn.next_functions:
            out |= names(nxt, seen)
        return out

    fused_nodes, plain_nodes = names(fused.grad_fn), names(plain.grad_fn)
    assert any(n.startswith("_LinearCE") for n in fused_nodes), fused_nodes
    assert not any("NllLoss" in n for n in fused_nodes), fused_nodes
    assert not any(n.startswith("_LinearCE") for n in plain_nodes), plain_nodes
    assert any("NllLoss" in n for n in plain_nodes), plain_nodes
    torch.testing.assert_close(plain, fused, rtol=1e-6, atol=1e-6)


def test_cuda_dispatch_choice_without_a_gpu():
    x = torch.randn(2, 3)  # the choice depends on the policy, not on running anything
    cu = ops.Kernels(backend="cuda")
    assert ops.implementation("rms_norm", x, cu) is C.rms_norm
    assert ops.implementation("rms_norm", x, cu.replace(fused_norm=False)) is R.rms_norm
    assert ops.implementation("attention", x, cu) is C.attention
    assert ops.implementation("attention", x, cu.replace(fused_attention=False)) is R.attention_math
    # no fused CUDA kernel: the reference either way (and kernels_for refuses to ask for it)
    assert ops.implementation("swiglu", x, cu) is R.swiglu
    assert ops.implementation("rotary", x, cu) is R.rotary
    # the reference backend: SDPA is its one fused op
    assert ops.implementation("attention", x) is R.attention
    assert ops.implementation("attention", x, ops.Kernels(fused_attention=False)) is R.attention_math
    assert ops.implementation("rms_norm", x) is R.rms_norm
    assert ops.implementation("rotary", x, NPU) is N.rotary
    assert ops.implementation("layer_norm", x, NPU) is R.layer_norm  # no policy field, no fusion


def test_available_table_matches_dispatch():
    """``kernels.AVAILABLE`` (what kernels_for checks) is exactly what dispatch can select."""
    x = torch.randn(2, 3)
    for b in ("reference", "cuda", "npu"):
        k = ops.Kernels(backend=b)
        for field, (op, _) in FIELD_OPS.items():
            fused = ops.implementation(op, x, k) is not ops.implementation(op, x, k.replace(**{field: False}))
            assert fused == (field in AVAILABLE[b]), (b, field)
        assert ("mc2" in AVAILABLE[b]) == (b == "npu")
    assert set(FUSED_FIELDS) == set(FIELD_OPS) | {"mc2", "fused_moe"}  # fused_moe: tests/test_moe_ops.py


def test_unfused_attention_matches_sdpa_with_masks_bias_and_bf16():
    B, T, H, D = 2, 6, 4, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, 2, D), torch.randn(B, T, 2, D)
    idx = torch.arange(T).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :2] = False
    m = ops.attention_mask(q_idx=idx, k_idx=idx, window=3, key_valid=valid)
    bias = ops.alibi_bias(ops.alibi_slopes(H), idx, idx)
    off = ops.Kernels(fused_attention=False)
    for kw in ({"causal": True}, {"mask": m}, {"mask": m, "bias": bias}):
        torch.testing.assert_close(ops.attention(q, k, v, kernels=off, **kw), ops.attention(q, k, v, **kw))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    torch.testing.assert_close(ops.attention(qb, kb, vb, causal=True, kernels=off).float(),
                               ops.attention(q, k, v, causal=True), rtol=2e-2, atol=2e-2)


def test_kernels_for_defaults_and_refusals():
    npu = ops.kernels_for(backend="npu")
    assert npu == ops.Kernels(backend="npu", mc2=False)
    assert ops.kernels_for(backend="npu", mc2=True, fused_rotary=False) == ops.Kernels(
        backend="npu", mc2=True, fused_rotary=False)
    cpu = ops.kernels_for(backend="cpu")
    assert cpu == ops.Kernels(backend="reference", fused_norm=False, fused_swiglu=False, fused_rotary=False,
                              fused_attention=True, fused_moe=False)
    assert ops.kernels_for(backend="cpu", flash_attn=False).fused_attention is False
    cuda = ops.kernels_for(backend="cuda", flash_attn=True, fused_rmsnorm=True)
    assert cuda.fused_norm and cuda.fused_attention and not cuda.fused_swiglu and not cuda.fused_rotary
    assert ops.kernels_for(backend="cuda", fused_swiglu=False).fused_swiglu is False  # asking for "off" is fine

    with pytest.raises(ops.KernelUnavailable, match=r"fused_rotary=True: the reference backend has no fused rotary"):
        ops.kernels_for(backend="cpu", fused_rotary=True)
    with pytest.raises(ValueError, match="mc2=True: the cuda backend has no MC2") as e:
        ops.kernels_for(backend="cuda", mc2=True, fused_swiglu=True, flash_attn=True)
    assert [a for a, _ in e.value.problems] == ["fused_swiglu", "mc2"] and e.value.backend == "cuda"
    for arg in ("fused_rmsnorm", "fused_swiglu", "fused_rotary", "mc2"):
        with pytest.raises(ops.KernelUnavailable, match=arg):
            ops.kernels_for(backend="reference", **{arg: True})
