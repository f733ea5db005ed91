"""Mixture-of-experts ops: routing, sort-based dispatch, grouped expert matmuls, combine.

The reference implementation (pure torch, the test oracle) works on a flat batch of ``N``
tokens, each routed to ``k`` experts:

1. :func:`moe_route`: router logits in fp32 -> softmax over the ``E`` experts -> top-k ->
   renormalise the k weights to sum to one (Mixtral; equal to Megatron's top-k of the logits
   followed by a softmax over the k).
2. :func:`moe_capacity_keep` (capacity mode only): which token-expert pairs an expert keeps.
3. :func:`moe_dispatch`: the ``N*k`` token-expert pairs sorted by expert (one stable sort, no
   Python loop over tokens); the token rows gathered in that order; ``counts[e]`` rows per
   expert. Dropped pairs are sorted past the last expert and cut off.
4. :func:`grouped_linear` / :func:`grouped_mlp`: every expert's matmul over its contiguous block
   of rows (one grouped matmul on CUDA, ``npu_grouped_matmul`` on NPU).
5. :func:`moe_combine`: rows scattered back to their pairs, weighted by the router weights and
   summed over the k experts of each token (a dropped pair contributes zero).

``dispatch`` returns a :class:`Routed` record (the sort order and counts) that ``combine``
consumes; an expert-parallel wrapper (:mod:`pmodel.parallel.expert`) exchanges the sorted rows
between ranks in between and implements :func:`grouped_mlp` itself (the weight protocol of
:mod:`pmodel.ops.weights`: a wrapper weight with a ``grouped_mlp`` method).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

__all__ = ["Routed", "moe_route", "moe_capacity", "moe_capacity_keep", "moe_dispatch", "moe_combine",
           "grouped_linear", "grouped_swiglu_mlp", "router_stats"]

DROP_POLICIES = ("probs", "position")


@dataclasses.dataclass(frozen=True)
class Routed:
    """How :func:`moe_dispatch` ordered the token-expert pairs (consumed by :func:`moe_combine`).

    Attributes:
      order: ``(M,)`` int64: flat pair index ``t * k + j`` of each dispatched row, sorted by
        expert (the kept pairs only; ``M = counts.sum()``).
      counts: ``(E,)`` int64 rows per expert (kept pairs).
      num_tokens: ``N``.
      top_k: ``k``.
      dropped: ``()`` int64: pairs dropped by the capacity (0 when dropless).
      keep, src_to_dst, experts: what the NPU lowering's combine needs (None on the reference
        path): the capacity mask, ``npu_moe_init_routing``'s source -> destination rows, the
        ``(N, k)`` experts.
    """

    order: torch.Tensor
    counts: torch.Tensor
    num_tokens: int
    top_k: int
    dropped: torch.Tensor
    keep: torch.Tensor | None = None
    src_to_dst: torch.Tensor | None = None
    experts: torch.Tensor | None = None


def moe_route(logits: torch.Tensor, top_k: int, *, renormalize: bool = True):
    """Softmax over experts, then top-k (Mixtral's router).

    Args:
      logits: ``(N, E)`` router logits (computed in fp32 by the caller).
      top_k: experts per token.
      renormalize: divide the k probabilities by their sum (Mixtral, Megatron's default).

    Returns:
      ``(probs (N, E) fp32, weights (N, k) fp32, experts (N, k) int64)``.
    """
    probs = torch.softmax(logits.float(), dim=-1)                 # (N, E)
    weights, experts = torch.topk(probs, top_k, dim=-1)           # (N, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, experts


def moe_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Megatron's expert capacity: ``ceil(N * k / E * capacity_factor)`` token slots per expert."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def moe_capacity_keep(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int,
                      policy: str = "probs") -> torch.Tensor:
    """Which token-expert pairs their expert keeps under a capacity (Megatron's drop policy).

    Each expert keeps at most ``capacity`` of the pairs routed to it: with ``policy="probs"``
    (Megatron's default ``--moe-token-drop-policy probs``) the pairs with the highest router
    weight (ties: the earlier token), with ``"position"`` the earliest tokens of the batch. Dropped
    pairs contribute nothing to the output; the kept weights are not renormalised (Megatron).

    Args:
      experts, weights: ``(N, k)`` from :func:`moe_route`.

    Returns:
      ``(N, k)`` bool, True = kept.
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"moe_capacity_keep: policy must be one of {DROP_POLICIES}, got {policy!r}")
    flat_e = experts.reshape(-1)                                  # (N*k,)
    n = flat_e.numel()
    pos = torch.arange(n, device=flat_e.device)
    if policy == "probs":
        # rank within the expert by descending weight, ties by position: sort by (expert, -w, pos)
        w = weights.detach().reshape(-1).float()
        by_w = torch.argsort(-w, stable=True)                     # descending weight, stable
        order = by_w[torch.argsort(flat_e[by_w], stable=True)]    # then by expert (stable)
    else:
        order = torch.argsort(flat_e, stable=True)                # by expert, then position
    sorted_e = flat_e[order]
    counts = torch.bincount(flat_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts                     # (E,)
    rank_in_expert = pos - starts[sorted_e]                       # rank of each sorted pair
    keep = torch.empty(n, dtype=torch.bool, device=flat_e.device)
    keep[order] = rank_in_expert < capacity
    return keep.view_as(experts)


def moe_dispatch(x: torch.Tensor, experts: torch.Tensor, num_experts: int, keep: torch.Tensor | None = None):
    """Token rows sorted by expert (reference).

    Args:
      x: ``(N, D)`` tokens.
      experts: ``(N, k)`` int64 expert of each pair.
      keep: ``(N, k)`` bool (capacity mode) or None (dropless).

    Returns:
      ``(xs (M, D), routed)``: ``xs[i] = x[routed.order[i] // k]``, grouped by expert.
    """
    N, k = experts.shape
    flat_e = experts.reshape(-1)
    if keep is not None:
        # dropped pairs sort past the last expert and are cut off
        flat_e = torch.where(keep.reshape(-1), flat_e, torch.full_like(flat_e, num_experts))
    order = torch.argsort(flat_e, stable=True)                    # (N*k,) pairs grouped by expert
    counts = torch.bincount(flat_e, minlength=num_experts + 1)
    kept = counts[:num_experts]
    M = N * k - int(counts[num_experts])
    order = order[:M]
    xs = x.index_select(0, order // k)                            # (M, D)
    routed = Routed(order=order, counts=kept, num_tokens=N, top_k=k, dropped=counts[num_experts].clone())
    return xs, routed


def moe_combine(ys: torch.Tensor, weights: torch.Tensor, routed: Routed) -> torch.Tensor:
    """Inverse of :func:`moe_dispatch`, weighted: ``out[t] = sum_j weights[t, j] * y(t, j)`` (reference).

    Args:
      ys: ``(M, D)`` expert outputs in dispatch order.
      weights: ``(N, k)`` router weights (fp32); cast to ``ys``'s dtype after the product.

    Returns:
      ``(N, D)``.
    """
    N, k = routed.num_tokens, routed.top_k
    full = ys.new_zeros(N * k, ys.shape[-1]).index_copy(0, routed.order, ys)   # (N*k, D), dropped rows 0
    out = (full.view(N, k, -1).float() * weights.unsqueeze(-1)).sum(1)        # (N, D) fp32
    return out.to(ys.dtype)


def grouped_linear(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-expert ``xs_e @ w[e].T`` over contiguous row blocks (reference: one matmul per expert).

    Args:
      xs: ``(M, in)`` rows grouped by expert.
      w: ``(E, out, in)``.
      counts: ``(E,)`` rows of each expert (sum ``M``).

    Returns:
      ``(M, out)``.
    """
    sizes = counts.tolist()
    # unbind, not w[e]: the backward of E separate w[e] selections would zero-fill and add E
    # full-size (E, out, in) gradients; unbind's backward stacks the E slices once.
    ws = w.unbind(0)
    parts = [F.linear(xe, ws[e]) for e, xe in enumerate(xs.split(sizes, 0)) if sizes[e]]
    if not parts:
        return xs.new_zeros(0, w.shape[1]) + 0 * w.sum()  # keep the graph connected
    return torch.cat(parts, 0)


def grouped_swiglu_mlp(xs, counts, gate, up, down, *, linear=grouped_linear, swiglu=None):
    """The experts' SwiGLU MLPs over rows grouped by expert: ``down(silu(gate(x)) * up(x))``.

    ``linear`` / ``swiglu`` are the backend's grouped matmul and SwiGLU (reference by default).
    """
    g, u = linear(xs, gate, counts), linear(xs, up, counts)
    h = swiglu(g, u) if swiglu is not None else F.silu(g) * u
    return linear(h, down, counts)


def router_stats(logits: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor, valid: torch.Tensor | None,
                 top_k: int, *, extra: dict | None = None, reduce=None) -> dict:
    """One layer's additive router statistics over its valid tokens (see ``pmodel.model``).

    Args:
      extra: more additive entries (e.g. dropped pairs) summed with the others.
      reduce: ``dict -> dict`` summing the additive entries (``counts``, ``prob_sum``, ``tokens``,
        ``z_sum`` and ``extra``) over the ranks that hold other tokens of the same sequences
        (sequence parallel); applied before the per-layer terms, which are not additive.

    Returns:
      dict of fp32 tensors: ``counts`` ``(E,)`` pairs routed to each expert (before any drop),
      ``prob_sum`` ``(E,)`` sum of router probabilities (differentiable), ``tokens`` ``()``,
      ``z_sum`` ``()`` sum of ``logsumexp(logits)^2`` (differentiable), ``layer_lb`` ``()`` this
      layer's Switch/Megatron balance term ``E / k * sum_e f_e P_e`` (differentiable), ``layers``.
    """
    E = probs.shape[-1]
    v = valid.reshape(-1, 1).float() if valid is not None else probs.new_ones(probs.shape[0], 1)
    onehot = F.one_hot(experts, E).float().sum(1)                 # (N, E) pairs per expert
    counts = (onehot * v).sum(0).detach()                         # (E,)
    prob_sum = (probs * v).sum(0)                                 # (E,)
    tokens = v.sum().detach()
    z_sum = (torch.logsumexp(logits.float(), dim=-1).pow(2) * v[:, 0]).sum()
    add = {"counts": counts, "prob_sum": prob_sum, "tokens": tokens, "z_sum": z_sum, **(extra or {})}
    if reduce is not None:
        add = reduce(add)
    counts, prob_sum, z_sum = add["counts"], add["prob_sum"], add["z_sum"]
    n = add["tokens"].clamp(min=1)
    layer_lb = E / top_k * ((counts / n) * (prob_sum / n)).sum()
    return {**add, "z_mean": z_sum / n, "layer_lb": layer_lb, "layers": probs.new_ones(())}
