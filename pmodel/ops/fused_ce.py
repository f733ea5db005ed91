"""Chunked fused linear + cross-entropy (exact).

At a 32k vocabulary the ``[B*T, V]`` logits, their fp32 copy, the softmax and its gradient
dominate a small model's activation memory. This op never holds more than one
``[chunk, V]`` block: the forward pass computes, chunk by chunk, the logits, the per-token
loss and already the gradients of the weighted loss sum with respect to the hidden states and
the output weight (softmax minus one-hot, times the token weight). Backward only scales them
by the incoming scalar gradient. The arithmetic is the same as logits -> log_softmax -> NLL,
so the result is exact up to fp32 summation order, and the cost is the same three matmuls as
the unfused path.
"""
from __future__ import annotations

import torch

from .reference import IGNORE_INDEX

# Rows per chunk so that a chunk's fp32 logits take about this many bytes.
_CHUNK_BYTES = 32 * 2**20


class _LinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, labels, weights, chunk_rows):
        # h: (N, D); w: (V, D); labels: (N,); weights: (N,) float32
        N = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32 math for bf16/fp16, fp64 stays fp64
        losses = torch.empty(N, dtype=acc, device=h.device)
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        valid_all = labels != IGNORE_INDEX
        for s in range(0, N, chunk_rows):
            e = min(N, s + chunk_rows)
            hc, lab = h[s:e], labels[s:e]
            valid = valid_all[s:e]
            logits = (hc @ w.t()).to(acc)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            tgt = logits.gather(1, safe[:, None])[:, 0]
            losses[s:e] = torch.where(valid, lse - tgt, torch.zeros_like(lse))
            if need_h or need_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(e - s, device=g.device), safe] -= 1.0
                g.mul_((weights[s:e] * valid)[:, None])
                if need_h:
                    gh[s:e] = (g.to(w.dtype) @ w).to(h.dtype)
                if need_w:
                    gw.addmm_(g.t(), hc.to(acc))
        ctx.save_for_backward(gh if need_h else None, gw if need_w else None)
        ctx.w_dtype = w.dtype
        total = (losses * weights).sum()
        ctx.mark_non_differentiable(losses)
        return total, losses

    @staticmethod
    def backward(ctx, grad_total, _grad_losses):
        gh, gw = ctx.saved_tensors
        dh = gh * grad_total.to(gh.dtype) if gh is not None else None
        dw = (gw * grad_total).to(ctx.w_dtype) if gw is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
                         weights: torch.Tensor, *, chunk_rows: int | None = None):
    """``sum_i weights_i * CE(h_i @ w.T, labels_i)`` without materialising all logits.

    Args:
      h: ``(..., D)`` hidden states; w: ``(V, D)`` output weight.
      labels: ``(...)`` int64, ``-100`` = ignore; weights: ``(...)`` per-token weights
        (e.g. ``loss_mask / num_tokens``).
      chunk_rows: rows per block (default: about 32 MiB of fp32 logits).

    Returns:
      ``(weighted_sum, per_token_losses)``: a differentiable scalar and the detached fp32
      per-token losses (0 at ignored labels), shaped like ``labels``.
    """
    D = h.shape[-1]
    rows = chunk_rows or max(16, _CHUNK_BYTES // (4 * w.shape[0]))
    total, losses = _LinearCE.apply(h.reshape(-1, D), w, labels.reshape(-1),
                                    weights.reshape(-1).to(torch.promote_types(h.dtype, torch.float32)), rows)
    return total, losses.view(labels.shape)
