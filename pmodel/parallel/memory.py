"""Per-rank memory accounting for a config and a parallel layout.

Model-state bytes per parameter follow Megatron-LM's distributed-optimizer table
(``docs/source/api-guide/dist_optimizer.md``): with bf16 parameters and bf16 gradients a rank
holds the bf16 param + grad (4 bytes) and, per parameter of its shard, an fp32 main gradient,
fp32 main parameter and two fp32 Adam moments (16 bytes): **20** plain, **4 + 16/d** distributed.
The replica (high-availability) layout shards over ``d/2`` ranks, so each shard is held twice:
**4 + 32/d**. With fp32 gradients there is no separate main gradient (bf16 params: 18 plain,
6 + 12/d distributed, as in Megatron's table).

Mixture of experts: the stacked expert weights (logical axis ``experts``) are divided by the
expert-parallel size ``ep`` and not by ``tp`` (TP leaves experts whole); the router and the
dense parts are held whole on every ``ep`` rank (replicated over ``ep``, divided by ``tp`` as
usual). The distributed optimizer shards over ``dp`` (the mesh's dims are independent), so the
per-parameter table applies to this rank's params as they are. The optimizer's number of fp32
moments is ``moments`` (Adam 2, SGD with momentum 1).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models"): ``s*b*h*(34 + 5*a*s/h)`` bytes per layer without recompute, the
``24 + 5as/h`` part divided by tp, the other 10 by tp only under sequence parallel.
"""
from __future__ import annotations

import dataclasses

import torch

from ..model import ModelConfig
from ..params import count, is_decl
from .. import tree

__all__ = ["MemoryEstimate", "bytes_per_param", "estimate", "measured_bytes"]


def bytes_per_param(*, layout: str, dp: int, param_bytes: int = 2, grad_bytes: int = 2, moments: int = 2) -> float:
    """Model-state bytes per parameter (params + grads + fp32 main grads/params + Adam moments).

    Args:
      layout: ``"plain"``, ``"distributed"`` or ``"replica"``.
      dp: data-parallel size.
      param_bytes, grad_bytes: 2 for bf16, 4 for fp32.
      moments: fp32 optimizer moments per parameter (Adam 2, SGD with momentum 1).

    Returns:
      bytes per parameter; Megatron's numbers for bf16/bf16 are 20, ``4 + 16/d``, ``4 + 32/d``.
    """
    if layout not in ("plain", "distributed", "replica"):
        raise ValueError(f"layout must be plain, distributed or replica, got {layout!r}")
    # Two fp32 moments, an fp32 main parameter (the distributed optimizer keeps one even for fp32
    # parameters; plain fp32 training updates the parameter itself) and an fp32 main gradient
    # unless the gradients already are fp32.
    main_param = 0 if (param_bytes == 4 and layout == "plain") else 4
    sharded = 4 * moments + main_param + (4 if grad_bytes != 4 else 0)
    if layout == "plain":
        return param_bytes + grad_bytes + sharded
    if layout == "distributed":
        return param_bytes + grad_bytes + sharded / dp
    if dp % 2:
        raise ValueError(f"replica layout needs an even dp, got {dp}")
    return param_bytes + grad_bytes + 2 * sharded / dp


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Per-rank bytes (the rank holding the most parameters: first pipeline stage with embeddings)."""

    params_per_rank: int
    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def gib(self) -> dict:
        return {k: getattr(self, k) / 2**30 for k in ("params", "grads", "optimizer", "activations", "total")}


def params_per_rank(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, ep: int = 1) -> int:
    """Parameters held by the busiest rank: TP-sharded matrices / tp, stacked expert weights / ep,
    replicated vectors (and the MoE router) whole, ``num_layers / pp`` layers plus the embedding
    (first stage) and, untied, the output layer (Megatron puts it on the last stage; we count the
    larger of the two ends)."""
    from ..model import decoder_defs
    defs = decoder_defs(cfg)
    per_layer = count(defs["layers"][0]) if cfg.num_layers else 0
    layer_sharded = layer_experts = 0
    for path, d in tree.paths(defs["layers"][0], is_leaf=is_decl):
        if "experts" in d.axes:
            layer_experts += d.numel
        elif any(a in ("heads", "kv_heads", "mlp") for a in d.axes):
            layer_sharded += d.numel
    if cfg.num_experts and cfg.num_experts % ep:
        raise ValueError(f"num_experts={cfg.num_experts} is not divisible by expert parallel size {ep}")
    kv = 2 * cfg.num_kv_heads * cfg.head_dim * cfg.hidden_size
    kv_rep = max(tp // cfg.num_kv_heads, 1)  # replicated K/V heads when kv_heads < tp
    layer_local = ((layer_sharded - kv) / tp + kv * kv_rep / tp + layer_experts / ep
                   + (per_layer - layer_sharded - layer_experts))
    layers = -(-cfg.num_layers // pp)
    emb = cfg.padded_vocab_size * cfg.hidden_size / tp
    first = emb + sum(count(defs[k]) for k in ("pos_embed", "embed_norm") if k in defs)
    # the last stage: the output layer (untied) or its own copy of the tied embedding, the final norm
    last = emb + count(defs["final_norm"])
    ends = first + last - (emb if cfg.tie_embeddings else 0) if pp == 1 else max(first, last)
    return int(layers * layer_local + ends)


def estimate(cfg: ModelConfig, *, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, layout: str = "plain",
             param_bytes: int = 2, grad_bytes: int = 2, micro_batch: int = 1, seq_len: int = 4096,
             sequence_parallel: bool = False, recompute: str = "none", moments: int = 2) -> MemoryEstimate:
    """Per-rank memory for ``cfg`` under a layout.

    Args:
      tp, pp, dp, ep: parallel sizes (``ep`` splits the experts of an MoE model).
      moments: fp32 optimizer moments per parameter (Adam 2, SGD with momentum 1).
      layout: optimizer layout (``plain`` / ``distributed`` / ``replica``).
      param_bytes, grad_bytes: storage widths.
      micro_batch, seq_len: activation shape.
      sequence_parallel: activations outside the TP regions divided by tp.
      recompute: ``"none"`` (Korthikanti et al. 2022: ``s*b*h*(34 + 5*a*s/h)`` bytes per layer,
        ``/tp`` for the TP parts, SP divides the rest) or ``"full"`` (``2*s*b*h`` per layer kept).

    Returns:
      a :class:`MemoryEstimate` (activations: the first pipeline stage holding ``pp`` micro-batches
      in flight under 1F1B; for an MoE model the dense formula, i.e. the k-fold dispatched expert
      rows are not modelled).
    """
    n = params_per_rank(cfg, tp=tp, pp=pp, ep=ep)
    bpp = bytes_per_param(layout=layout, dp=dp, param_bytes=param_bytes, grad_bytes=grad_bytes, moments=moments)
    opt = bpp - param_bytes - grad_bytes
    s, b, h, a = seq_len, micro_batch, cfg.hidden_size, cfg.num_heads
    if recompute == "full":
        per_layer = 2 * s * b * h
    elif recompute == "none":
        # Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", eq. 2-4.
        tp_part = s * b * h * (24 + 5 * a * s / h) / tp
        rest = s * b * h * 10 / (tp if sequence_parallel else 1)
        per_layer = tp_part + rest
    else:
        raise ValueError(f"recompute must be 'none' or 'full', got {recompute!r}")
    layers = -(-cfg.num_layers // pp)
    in_flight = pp  # 1F1B: the first stage holds pp micro-batches
    act = per_layer * layers * in_flight
    return MemoryEstimate(params_per_rank=n, params=n * param_bytes, grads=n * grad_bytes,
                          optimizer=n * opt, activations=act)


def measured_bytes(params, opt_state=None, grad_buffers=None) -> dict:
    """Bytes actually held by this rank's parameter, gradient-buffer and optimizer tensors
    (each storage counted once)."""
    def total(ts):
        seen, n = set(), 0
        for t in ts:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                n += t.untyped_storage().nbytes()
        return n

    out = {"params": total(tree.leaves(params))}
    if grad_buffers is not None:
        out["grads"] = total(grad_buffers)
    if opt_state is not None:
        out["optimizer"] = total(t for t in tree.leaves(opt_state) if isinstance(t, torch.Tensor) and t.dim() > 0)
    return out
