"""Reference ops against float64 from-the-formula implementations (and gradcheck)."""
from __future__ import annotations

import math

import pytest
import torch

from pmodel import ops
from pmodel.ops import reference as R
from pmodel.ops.fused_ce import linear_cross_entropy

f64 = torch.float64


def test_rms_norm_matches_formula_and_gemma_offset():
    x, w = torch.randn(3, 5, 16), torch.randn(16)
    for offset in (0.0, 1.0):
        want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + w.double())
        got = ops.rms_norm(x, w, 1e-6, offset)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_layer_norm_matches_formula():
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    xd = x.double()
    want = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5) * w.double() + b.double()
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5).double(), want, rtol=1e-5, atol=1e-5)


def _rope_formula(x, pos, theta, rot, interleaved):
    # x (B, T, H, D) float64; rotate pairs by angle pos * theta^(-2i/rot)
    out = x.clone()
    B, T, H, D = x.shape
    for i in range(rot // 2):
        freq = theta ** (-2 * i / rot)
        a = pos.double()[:, :, None] * freq  # (B, T, 1)
        j, k = (2 * i, 2 * i + 1) if interleaved else (i, i + rot // 2)
        xj, xk = x[..., j], x[..., k]
        out[..., j] = xj * torch.cos(a) - xk * torch.sin(a)
        out[..., k] = xk * torch.cos(a) + xj * torch.sin(a)
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rotary_matches_formula(interleaved, fraction):
    B, T, H, D = 2, 7, 3, 16
    rot = int(D * fraction)
    x = torch.randn(B, T, H, D, dtype=f64)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 9, 10, 11, 40]])
    inv = R.rope_inv_freq(rot, 10000.0).double()
    cos, sin = R.rope_cos_sin(pos, inv, f64)
    got = R.rotary(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(got, _rope_formula(x, pos, 10000.0, rot, interleaved), rtol=1e-5, atol=1e-5)


def test_rope_scaling_linear_and_llama3():
    inv = R.rope_inv_freq(64, 500000.0)
    torch.testing.assert_close(R.rope_inv_freq(64, 500000.0, {"rope_type": "linear", "factor": 4.0}), inv / 4)
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    got = R.rope_inv_freq(64, 500000.0, sc)
    # Formula (Meta's Llama 3.1 reference, apply_scaling): high frequencies unchanged, low divided
    # by factor, smooth interpolation in between.
    want = []
    for f in inv.double().tolist():
        wl = 2 * math.pi / f
        if wl < 8192 / 4.0:
            want.append(f)
        elif wl > 8192 / 1.0:
            want.append(f / 8.0)
        else:
            s = (8192 / wl - 1.0) / (4.0 - 1.0)
            want.append((1 - s) * f / 8.0 + s * f)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=f64), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="unsupported rope scaling"):
        R.rope_inv_freq(64, 1e4, {"rope_type": "yarn", "factor": 2})


def test_alibi_slopes_known_values():
    # Press et al.: 8 heads -> 1/2, 1/4, ..., 1/256; 12 heads interleave the 8- and 16-head series.
    torch.testing.assert_close(R.alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s12 = R.alibi_slopes(12)
    want = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
    torch.testing.assert_close(s12, torch.tensor(want))


def _attn_formula(q, k, v, allowed, bias=None):
    B, T, Hq, D = q.shape
    g = Hq // k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            s = q[b, :, h] @ k[b, :, h // g].T / math.sqrt(D)
            if bias is not None:
                s = s + bias[b, h]
            s = s.masked_fill(~allowed[b], float("-inf"))
            out[b, :, h] = torch.softmax(s, -1) @ v[b, :, h // g]
    return out


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_attention_causal_gqa_mqa(hkv):
    B, T, H, D = 2, 6, 4, 8
    q, k, v = torch.randn(B, T, H, D, dtype=f64), torch.randn(B, T, hkv, D, dtype=f64), torch.randn(B, T, hkv, D, dtype=f64)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    want = _attn_formula(q, k, v, allowed)
    torch.testing.assert_close(ops.attention(q, k, v, causal=True), want)
    torch.testing.assert_close(R.attention_math(q, k, v, causal=True), want)


def test_attention_window_docs_padding_bias():
    B, T, H, D = 2, 8, 2, 4
    q, k, v = (torch.randn(B, T, H, D, dtype=f64) for _ in range(3))
    idx = torch.arange(T).expand(B, T)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :2] = False  # left padding on row 1
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0] * 8])
    m = ops.attention_mask(q_idx=idx, k_idx=idx, window=3, key_valid=valid, q_doc=doc, k_doc=doc)
    i, j = idx[0][:, None], idx[0][None, :]
    allowed = (j <= i) & (i - j < 3)
    allowed = allowed.expand(B, T, T) & valid[:, None, :] & (doc[:, :, None] == doc[:, None, :])
    assert torch.equal(m[:, 0] & allowed.any(-1, keepdim=True), allowed)
    bias = R.alibi_bias(R.alibi_slopes(H).double(), idx, idx).double()
    got = ops.attention(q, k, v, mask=m, bias=bias)
    want = _attn_formula(q, k, v, allowed | ~allowed.any(-1, keepdim=True), bias)
    rows = allowed.any(-1)  # pad query rows are unread garbage by design
    torch.testing.assert_close(got[rows[..., None].expand(B, T, H)], want[rows[..., None].expand(B, T, H)])


def test_attention_decode_with_cache_positions():
    # One query at slot 5 against 6 cached keys equals the last row of full causal attention.
    B, S, H, D = 1, 6, 2, 4
    q, k, v = (torch.randn(B, S, H, D, dtype=f64) for _ in range(3))
    full = ops.attention(q, k, v, causal=True)
    m = ops.attention_mask(q_idx=torch.tensor([[5]]), k_idx=torch.arange(S)[None])
    torch.testing.assert_close(ops.attention(q[:, 5:], k, v, mask=m), full[:, 5:])


def test_mlp_activations():
    g, u = torch.randn(5, 7, dtype=f64), torch.randn(5, 7, dtype=f64)
    torch.testing.assert_close(ops.swiglu(g, u), g / (1 + torch.exp(-g)) * u)
    tanh_gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    torch.testing.assert_close(ops.geglu(g, u), tanh_gelu * u)
    torch.testing.assert_close(ops.gelu(g), tanh_gelu)


def test_cross_entropy_ignore_index_fp32():
    logits = torch.randn(2, 5, 11, dtype=torch.bfloat16)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 1] = -100
    got = ops.cross_entropy(logits, labels)
    assert got.dtype == torch.float32 and got[0, 1] == 0
    lf = logits.double()
    want = torch.logsumexp(lf, -1) - lf.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    want[0, 1] = 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


def test_fused_linear_cross_entropy_equals_unfused():
    N, D, V = 37, 16, 50
    h = torch.randn(N, D, dtype=f64, requires_grad=True)
    w = torch.randn(V, D, dtype=f64, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    labels[::5] = -100
    weights = torch.rand(N, dtype=f64)
    tot, per = linear_cross_entropy(h, w, labels, weights, chunk_rows=8)
    (gh, gw) = torch.autograd.grad(2.0 * tot, (h, w))
    h2, w2 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    per2 = torch.nn.functional.cross_entropy(h2 @ w2.T, labels, ignore_index=-100, reduction="none")
    tot2 = (per2 * weights.double()).sum()
    gh2, gw2 = torch.autograd.grad(2.0 * tot2, (h2, w2))
    for got, want in ((tot, tot2), (per, per2.detach()), (gh, gh2), (gw, gw2)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_fused_linear_cross_entropy_gradcheck():
    h = torch.randn(6, 4, dtype=f64, requires_grad=True)
    w = torch.randn(9, 4, dtype=f64, requires_grad=True)
    labels = torch.tensor([1, -100, 3, 8, 0, 2])
    weights = torch.rand(6, dtype=f64)
    f = lambda a, b: linear_cross_entropy(a, b, labels, weights, chunk_rows=4)[0]
    assert torch.autograd.gradcheck(f, (h, w))


def test_kernels_policy_validates_and_routes():
    with pytest.raises(ValueError, match="backend"):
        ops.Kernels(backend="tpu")
    x = torch.randn(2, 3)
    assert ops.backend_name(x, None) == "reference"
    assert ops.backend_name(x, ops.Kernels(backend="npu")) == "npu"
