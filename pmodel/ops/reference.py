"""Reference implementations: pure torch, every backend's test oracle.

Tensor layout conventions: activations ``(B, T, D)``; attention heads ``(B, T, H, Dh)``;
linear weights ``[out, in]`` as in PyTorch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- norms
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """``x / rms(x) * (offset + weight)``, computed in fp32 and cast back to ``x.dtype``.

    ``offset=1.0`` is Gemma's ``1 + w`` parameterisation.
    """
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (y * (offset + weight.float())).to(x.dtype)
    # LLaMA casts the normalised activations back before scaling (HF does the same).
    return weight * y.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------- rotary
def rope_inv_freq(rot_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies ``(rot_dim // 2,)`` in fp32, with linear / llama3 / dynamic-free scaling.

    ``scaling``: None, ``{"rope_type": "linear", "factor": f}`` (positions divided by f, applied
    here as frequencies divided by f), or ``{"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"}`` (Meta's Llama 3.1 recipe).
    """
    inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old / low, old / high
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r} (expected linear or llama3)")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for integer ``positions`` ``(B, T)`` -> each ``(B, T, rot_dim // 2)``."""
    ang = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)[None, None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of each head; pass the rest through.

    Args:
      x: ``(B, T, H, Dh)``.
      cos, sin: ``(B, T, R/2)`` where R is the rotary width (partial rotary when R < Dh).
      interleaved: pairs are ``(x0, x1), (x2, x3), ...`` (GPT-J / Meta / ChatGLM) instead of
        ``(x_i, x_{i+R/2})`` (rotate-half, HF LLaMA / GPT-NeoX).
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, R/2)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


# ----------------------------------------------------------------------------- alibi
def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), including the non-power-of-two interleave rule."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = pow2(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        s = pow2(closest) + pow2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(s, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Additive bias ``(B, H, T, S)``: ``-slope * (q_pos - k_pos)``.

    Bloom and Baichuan add ``slope * k_pos``; per query row that differs by a constant, which
    softmax ignores, so both conventions give the same attention.
    """
    dist = (q_pos[:, None, :, None] - k_pos[:, None, None, :]).float()  # (B, 1, T, S)
    return -slopes.to(q_pos.device)[None, :, None, None] * dist


# ----------------------------------------------------------------------------- attention
def attention_mask(*, q_idx: torch.Tensor, k_idx: torch.Tensor, causal: bool = True,
                   q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
                   window: int | None = None, key_valid: torch.Tensor | None = None,
                   q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean "may attend" mask ``(B, 1, T, S)`` (True = attend).

    Args:
      q_idx, k_idx: ``(B, T)`` / ``(B, S)`` slot indices in the key buffer (causality).
      q_pos, k_pos: token positions (sliding window distance; positions skip left padding).
      window: sliding window size W: a query sees keys with ``q_pos - k_pos < W``.
      key_valid: ``(B, S)`` False for padding / unused cache slots.
      q_doc, k_doc: document ids for packed sequences; attention never crosses documents.
    """
    m = torch.ones(q_idx.shape[0], q_idx.shape[1], k_idx.shape[1], dtype=torch.bool, device=q_idx.device)
    if causal:
        m &= k_idx[:, None, :] <= q_idx[:, :, None]
    if window is not None:
        qp = q_idx if q_pos is None else q_pos
        kp = k_idx if k_pos is None else k_pos
        m &= (qp[:, :, None] - kp[:, None, :]) < window
    if key_valid is not None:
        m &= key_valid[:, None, :].bool()
    if q_doc is not None:
        m &= q_doc[:, :, None] == k_doc[:, None, :]
    # A query row with no visible key (a left-pad position) would give NaN; let it see every
    # key instead: its output is garbage but finite, and nothing reads it (loss masks pads).
    empty = ~m.any(-1, keepdim=True)
    m = m | empty
    return m[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              causal: bool = False, bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention with GQA/MQA.

    Args:
      q: ``(B, T, Hq, Dh)``; k, v: ``(B, S, Hkv, Dh)`` with ``Hq % Hkv == 0``.
      mask: boolean ``(B, 1, T, S)`` (True = attend), or None.
      causal: plain lower-triangular causality (only used when ``mask`` is None and T == S).
      bias: additive float ``(B, H, T, S)`` (ALiBi), combined with ``mask``.
      scale: softmax scale, default ``1/sqrt(Dh)``.

    Returns:
      ``(B, T, Hq, Dh)``.
    """
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads not divisible by {hkv} kv heads")
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, Dh)
    if hkv != hq:
        kh = kh.repeat_interleave(hq // hkv, dim=1)
        vh = vh.repeat_interleave(hq // hkv, dim=1)
    if mask is None and causal and q.shape[1] != k.shape[1]:
        raise ValueError("attention: causal without a mask needs T == S")
    attn_mask = mask
    if bias is not None:
        if mask is None and causal:  # SDPA takes is_causal or attn_mask, not both: fold causality in
            mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).tril()[None, None]
        b = bias.to(q.dtype)
        attn_mask = b if mask is None else b.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=attn_mask,
                                         is_causal=causal and attn_mask is None, scale=scale)
    return out.transpose(1, 2)


def attention_math(q, k, v, *, mask=None, causal=False, bias=None, scale=None):
    """The same contract as :func:`attention`, by the textbook formula.

    The unfused path (``Kernels(fused_attention=False)``, Megatron's attention without
    ``--use-flash-attn``): materialises the ``(B, H, T, S)`` scores and takes the softmax in fp32
    (fp64 stays fp64); also the test oracle.
    """
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads not divisible by {hkv} kv heads")
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kh = kh.repeat_interleave(hq // hkv, dim=1)
    vh = vh.repeat_interleave(hq // hkv, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (qh @ kh.transpose(-1, -2)).to(acc) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        s = s + bias.to(acc)
    if mask is None and causal:
        T, S = q.shape[1], k.shape[1]
        if T != S:
            raise ValueError("attention: causal without a mask needs T == S")
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ vh).transpose(1, 2)


# ----------------------------------------------------------------------------- MLP activations
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GeGLU with the tanh GeLU approximation (Gemma's ``gelu_pytorch_tanh``)."""
    return F.gelu(gate, approximate="tanh") * up


def gelu(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


# ----------------------------------------------------------------------------- loss
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token cross-entropy in fp32 (0 where ``labels == ignore_index``).

    Args:
      logits: ``(..., V)``; labels: ``(...)`` int64.
    Returns:
      ``(...)`` float32 losses.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="none")
    return loss.view(labels.shape)
