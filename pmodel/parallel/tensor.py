"""Tensor and sequence parallelism as a Model transform.

:func:`tensor_parallel` derives each parameter's role from its logical axes:

* ``[out, in]`` weights whose ``out`` axis is ``heads``, ``kv_heads`` or ``mlp`` are **column
  parallel** (q/k/v, gate/up): each rank holds ``out / tp`` rows and produces its own heads / MLP
  columns; their biases are sharded the same way.
* weights whose ``in`` axis is ``heads`` or ``mlp`` are **row parallel** (o_proj, down_proj):
  each rank holds ``in / tp`` columns, computes a partial sum and the wrapper reduces it; their
  (``embed``-axis) bias is replicated and added after the reduction.
* ``vocab``-axis matrices are **vocab parallel**: the embedding looks up only its rows (others
  give zeros, summed over ranks), the output layer gives vocab-sharded logits and the
  cross-entropy is computed on them with three small all-reduces per token (max, sum of exp,
  target logit) — the full logits never exist on any rank.
* everything else (norms, position embeddings, row-parallel biases) is replicated.

The roles are wrapper leaves (:class:`ColumnParallel`, :class:`RowParallel`,
:class:`VocabParallel`) that :mod:`pmodel.ops` dispatches to, so the decoder code is unchanged:
it reads local head counts from the weights it receives.

When ``kv_heads < tp`` each K/V head is replicated on ``tp / kv_heads`` consecutive ranks (those
whose query heads use it). Each replica receives only its own query heads' share of the gradient,
so the wrapper sums the K/V weight (and bias) gradients over the replicas in backward.

**LoRA** (``tensor_parallel(lora(model), mesh)``): the factors' roles follow their logical axes
(``a`` is ``("lora_rank", in_axis)``, ``b`` is ``(out_axis, "lora_rank")``), so for a
column-parallel base ``b`` is sharded along ``out`` and ``a`` replicated, and for a row-parallel
base ``a`` is sharded along ``in`` and ``b`` replicated. The params keep the single-process
structure ``LoRA(base, a, b)`` (local shards inside, same paths, so checkpoints, adapter export
and dropout keys are unchanged) and the transformed ``block`` wraps each adapted weight as
``ColumnParallel(LoRA(...))`` / ``RowParallel(LoRA(...))`` when it runs: the parallel wrapper is
outermost and owns the communication, the LoRA inside computes on local shards. A row-parallel
LoRA's low-rank partial products are added to the base's partial sum before the one reduction
(the sum is linear), so LoRA costs no extra communication in the forward. The replicated factor
(``a`` of a column-parallel, ``b`` of a row-parallel base) gets only this rank's part of its
gradient (``a``: the contribution through the local rows of ``b``; ``b``: through the local
columns of ``a``), so :func:`sync_replicated_grads` all-reduces it over TP after backward, in
the same flat buffer as the sequence-parallel norm gradients. LoRA dropout masks are drawn for
the full input and sliced, so they equal the single-process masks.

**Sequence parallel** (``sequence_parallel=True``) keeps the residual stream ``(B, T/tp, D)``
sharded on the sequence between TP regions: column layers all-gather the sequence before their
matmul (backward: reduce-scatter), row layers reduce-scatter their partial sums (backward:
all-gather), and norms run on the shards. Replicated parameters used on the shards (norm weights,
row-parallel biases) then hold only their shard's gradient: :func:`sync_replicated_grads`
all-reduces them over TP and must run after backward (the train step built by
:func:`pmodel.parallel.parallelize` does it).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .. import ops, tree
from ..lora import LoRA, dropout_mask, is_lora
from ..params import P, is_decl
from . import comm
from .mesh import Mesh

__all__ = [
    "ColumnParallel", "RowParallel", "VocabParallel", "TPLayout", "tensor_parallel", "tp_layout",
    "shard_params", "sync_sequence_parallel_grads", "sync_replicated_grads", "sequence_parallel_paths",
    "replicated_grad_paths", "tp_size_problems",
]

TP_AXES = ("heads", "kv_heads", "mlp")


# ============================================================================ replica gradient sum
class _SumOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks holding the same K/V head.

    The ``tp`` ranks hold ``slots = kv_heads`` distinct heads (``tp / kv_heads`` copies each).
    Each rank writes its gradient into its head's slot of a zero buffer and one all-reduce over
    the TP group sums every slot's copies at once (no per-head subgroups needed).
    """

    @staticmethod
    def forward(ctx, w, group, slot, slots):
        ctx.group, ctx.slot, ctx.slots = group, slot, slots
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        buf = g.new_zeros((ctx.slots,) + tuple(g.shape))  # (kv_heads, *w.shape)
        buf[ctx.slot] = g
        buf = comm.all_reduce(buf, ctx.group)
        return buf[ctx.slot], None, None, None


# ============================================================================ wrapper leaves
class _Parallel:
    """Base for the parallel wrappers: one local tensor plus static communication info."""

    def __init__(self, shard: torch.Tensor, *, group, sequence_parallel: bool):
        self.shard = shard
        self.group = group
        self.sequence_parallel = bool(sequence_parallel)

    # pytree plumbing: the local tensor is the only child; the rest is static context.
    def _static(self):
        return (self.group, self.sequence_parallel)

    @property
    def shape(self):  # local shape (what this rank stores)
        return self.shard.shape

    def _tensor(self) -> torch.Tensor:
        # A LoRA shard reports its base weight's dtype / device (the factors follow it).
        return self.shard.base if isinstance(self.shard, LoRA) else self.shard

    @property
    def dtype(self):
        return self._tensor().dtype

    @property
    def device(self):
        return self._tensor().device

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (or, under SP, sequence-sharded) input -> full input of a TP region."""
        if self.sequence_parallel:
            return comm.gather_from_sequence(x, self.group, 1, reduce_grad=True)  # (B, T, D)
        return comm.copy_to_tp(x, self.group)

    def __repr__(self):
        return f"{type(self).__name__}({tuple(self.shard.shape)}, sp={self.sequence_parallel})"


class ColumnParallel(_Parallel):
    """``[out/tp, in]`` rows of a column-parallel weight.

    ``replica = (slot, slots)`` marks a replicated K/V projection (``kv_heads < tp``): the local
    rows are the whole head ``slot`` of ``slots`` and gradients are summed over its copies.
    """

    def __init__(self, shard, *, group, sequence_parallel, replica: tuple[int, int] | None = None):
        super().__init__(shard, group=group, sequence_parallel=sequence_parallel)
        self.replica = replica

    def _static(self):
        return (self.group, self.sequence_parallel, self.replica)

    def _sync(self, t):
        if self.replica is None or t is None or not t.requires_grad:
            return t
        return _SumOverReplicas.apply(t, self.group, *self.replica)

    def _weight(self):
        """The local weight, with replicated-K/V gradient sums attached where needed."""
        w = self.shard
        if isinstance(w, LoRA):
            # base and b hold the local rows (the K/V head under replication); a is replicated
            # and synced after backward (sync_replicated_grads).
            return w.replace(base=self._sync(w.base), b=self._sync(w.b))
        return self._sync(w)

    def linear(self, x, bias=None, *, kernels=None):
        x = self._enter(x)  # (B, T, in) full sequence
        # A LoRA inside sees the full input, so its dropout mask is the single-process one.
        return ops.linear(x, self._weight(), self._sync(bias), kernels=kernels)  # (B, T, out/tp)


class RowParallel(_Parallel):
    """``[out, in/tp]`` columns of a row-parallel weight; reduces the partial sums itself."""

    def linear(self, x, bias=None, *, kernels=None):
        w = self.shard
        if isinstance(w, LoRA) and w.dropout > 0 and isinstance(w.key, int):
            y = self._lora_dropout_partial(x, w, kernels)  # (B, T, out) partial sum
        else:
            # x: (B, T, in/tp). With a LoRA shard the low-rank partial product (x_r A_rᵀ) Bᵀ is
            # part of this partial sum, so it joins the one reduction below.
            y = ops.linear(x, w, kernels=kernels)  # (B, T, out) partial sum over this rank's inputs
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence(y, self.group, 1)  # (B, T/tp, out)
        else:
            y = comm.reduce_from_tp(y, self.group)
        # The bias is replicated: add it once, after the reduction.
        return y if bias is None else y + bias

    def _lora_dropout_partial(self, x, w: LoRA, kernels):
        """LoRA with dropout on a row shard: the mask is drawn for the full input ``(..., in)``
        from the leaf's key and this rank's columns are kept, so the masks (and results) equal
        the single-process ones; otherwise each rank would draw an unrelated local-shape mask."""
        n, tp, r = x.shape[-1], comm.group_size(self.group), comm.group_rank(self.group)
        keep = dropout_mask(int(w.key), tuple(x.shape[:-1]) + (n * tp,), w.dropout, x.device)  # (..., in)
        keep = keep[..., r * n:(r + 1) * n].to(x.dtype)  # (..., in/tp)
        xd = x * keep / (1.0 - w.dropout)
        # The same formula as LoRA.linear, with the dropped input supplied from outside.
        y = ops.linear(x, w.base, kernels=kernels)  # (..., out)
        u = ops.linear(xd, w.a, kernels=kernels)  # (..., r)
        return y + ops.linear(u * w.scale, w.b, kernels=kernels)  # (..., out)


class VocabParallel(_Parallel):
    """``[V/tp, D]`` rows (``[lo, lo + V/tp)``) of the embedding / output matrix."""

    def __init__(self, shard, *, group, sequence_parallel, vocab_start: int):
        super().__init__(shard, group=group, sequence_parallel=sequence_parallel)
        self.vocab_start = int(vocab_start)

    def _static(self):
        return (self.group, self.sequence_parallel, self.vocab_start)

    def embedding(self, tokens, *, kernels=None):
        lo, n = self.vocab_start, self.shard.shape[0]
        outside = (tokens < lo) | (tokens >= lo + n)  # (B, T) rows another rank owns
        local = (tokens - lo).masked_fill(outside, 0)
        e = ops.embedding(local, self.shard, kernels=kernels)  # (B, T, D)
        e = e.masked_fill(outside.unsqueeze(-1), 0.0)
        # Exactly one rank contributes each token's row: the sum is the full lookup. Sequence
        # parallel scatters afterwards (in the transformed ``embed``), once position embeddings
        # and the embedding norm have been applied on the full sequence.
        return comm.reduce_from_tp(e, self.group)

    def linear(self, x, bias=None, *, kernels=None):
        if bias is not None:
            raise NotImplementedError("VocabParallel: an output-layer bias is not supported")
        x = self._enter(x)
        logits = ops.linear(x, self.shard, kernels=kernels)  # (B, T, V/tp)
        return comm.gather_from_tp(logits, self.group, -1)  # (B, T, V) only for apply()/generate

    def linear_cross_entropy(self, h, labels, weights, *, kernels=None):
        x = self._enter(h)  # (B, T, D)
        logits = ops.linear(x, self.shard, kernels=kernels)  # (B, T, V/tp): never gathered
        V = logits.shape[-1]
        loss_sum, per_tok = _VocabParallelCE.apply(logits.reshape(-1, V), labels.reshape(-1),
                                                   weights.reshape(-1).float(), self.vocab_start, self.group)
        return loss_sum, per_tok.view(labels.shape)


for _cls in (ColumnParallel, RowParallel, VocabParallel):
    def _children(obj):
        return [obj.shard], obj._static()

    def _rebuild(children, static, cls=_cls):
        obj = cls.__new__(cls)
        obj.shard = children[0]
        if cls is ColumnParallel:
            obj.group, obj.sequence_parallel, obj.replica = static
        elif cls is VocabParallel:
            obj.group, obj.sequence_parallel, obj.vocab_start = static
        else:
            obj.group, obj.sequence_parallel = static
        return obj

    tree.register_node(_cls, _children, _rebuild, ("shard",))


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over vocab-sharded logits (Megatron's vocab-parallel cross-entropy).

    Forward: ``loss = log(sum_v exp(z_v - m)) + m - z_label`` with the max ``m``, the sum of
    exponentials and the label logit each all-reduced over TP. Backward:
    ``(softmax_local - onehot_local) * weight * g``, purely local.
    """

    @staticmethod
    def forward(ctx, logits, labels, weights, vocab_start, group):
        # logits: (N, V/tp); labels, weights: (N,)
        z = logits.float()
        m = comm.all_reduce(z.max(dim=-1).values, group, op=torch.distributed.ReduceOp.MAX)  # (N,)
        z = z - m[:, None]
        e = z.exp()
        s = comm.all_reduce(e.sum(dim=-1), group)  # (N,)
        n = z.shape[1]
        local = labels - vocab_start
        mine = (local >= 0) & (local < n)  # ignored labels (-100) are never "mine"
        safe = local.masked_fill(~mine, 0)
        tgt = z.gather(1, safe[:, None])[:, 0].masked_fill(~mine, 0.0)
        tgt = comm.all_reduce(tgt, group)  # (N,)
        valid = labels != ops.IGNORE_INDEX
        loss = (s.log() - tgt).masked_fill(~valid, 0.0)  # (N,)
        e.div_(s[:, None])  # softmax, kept for backward
        ctx.save_for_backward(e, safe, mine, weights * valid)
        ctx.in_dtype = logits.dtype
        ctx.mark_non_differentiable(loss)
        return (loss * weights).sum(), loss

    @staticmethod
    def backward(ctx, g_sum, g_tok):
        soft, safe, mine, w = ctx.saved_tensors
        grad = soft
        grad[torch.arange(grad.shape[0], device=grad.device)[mine], safe[mine]] -= 1.0
        grad.mul_((w * g_sum)[:, None])
        return grad.to(ctx.in_dtype), None, None, None, None


# ============================================================================ layout + init hook
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TPLayout:
    """How a model's parameters are split over the TP group (also the model's ``shard`` hook).

    Attributes:
      mesh: the :class:`Mesh` (its ``tp`` dimension is used).
      sequence_parallel: SP on.
      num_heads, num_kv_heads: the model's (global) head counts.
      lora_nodes: paths of the LoRA nodes (``layers.0.attn.q_proj.weight``); their ``base`` /
        ``a`` / ``b`` are cut like any leaf but kept as plain tensors, because the parallel
        wrapper goes around the whole LoRA node when the block runs.
    """

    mesh: Mesh
    sequence_parallel: bool
    num_heads: int
    num_kv_heads: int
    lora_nodes: frozenset = frozenset()  # paths of LoRA nodes: their children stay plain tensors

    @property
    def tp(self) -> int:
        return self.mesh.size("tp")

    @property
    def rank(self) -> int:
        return self.mesh.rank("tp")

    @property
    def group(self):
        return self.mesh.group("tp")

    def role(self, path: str, decl: P) -> str:
        """``"column"``, ``"row"``, ``"vocab"``, ``"column_bias"``, ``"kv_replica"``,
        ``"kv_replica_bias"`` or ``"replicated"`` for a declaration."""
        axes = decl.axes
        if len(axes) == 2:
            if axes[0] in TP_AXES:
                if axes[0] == "kv_heads" and self.num_kv_heads < self.tp:
                    return "kv_replica"
                return "column"
            if axes[1] in TP_AXES:
                return "row"
            if axes[0] == "vocab":
                return "vocab"
            if "vocab" in axes[1:] or any(a in TP_AXES for a in axes):
                raise NotImplementedError(f"tensor_parallel: no TP role for {path} with axes {axes}")
            return "replicated"
        if len(axes) == 1:
            if axes[0] in TP_AXES:
                if axes[0] == "kv_heads" and self.num_kv_heads < self.tp:
                    return "kv_replica_bias"
                return "column_bias"
            if axes[0] == "vocab":
                raise NotImplementedError(f"tensor_parallel: vocab-sized vector {path} is not supported")
            return "replicated"
        if any(a in TP_AXES + ("vocab",) for a in axes):
            raise NotImplementedError(f"tensor_parallel: no TP role for {len(axes)}-d {path} with axes {axes}")
        return "replicated"

    def _kv_slot(self) -> tuple[int, int]:
        # Rank r's query heads [r*H/tp, (r+1)*H/tp) all use K/V head r // (tp / kv_heads).
        per = self.tp // self.num_kv_heads
        return self.rank // per, self.num_kv_heads

    def local(self, path: str, decl: P, full: torch.Tensor) -> Any:
        """The leaf this rank keeps for ``full`` (a clone, so the full draw can be freed)."""
        role = self.role(path, decl)
        t, r, g, sp = self.tp, self.rank, self.group, self.sequence_parallel
        in_lora = path.rpartition(".")[0] in self.lora_nodes
        if role == "replicated":
            return full
        if role in ("kv_replica", "kv_replica_bias"):
            slot, slots = self._kv_slot()
            part = full.chunk(slots, dim=0)[slot].clone()
            if role == "kv_replica_bias" or in_lora:
                return part
            return ColumnParallel(part, group=g, sequence_parallel=sp, replica=(slot, slots))
        dim = 1 if role == "row" else 0
        if full.shape[dim] % t:
            raise ValueError(f"tensor_parallel: {path} dim {dim} of size {full.shape[dim]} is not divisible by tp={t}")
        part = full.chunk(t, dim=dim)[r].clone()
        if in_lora:
            return part  # wrapped around the whole LoRA node at call time (see tensor_parallel)
        if role == "column":
            return ColumnParallel(part, group=g, sequence_parallel=sp)
        if role == "row":
            return RowParallel(part, group=g, sequence_parallel=sp)
        if role == "vocab":
            return VocabParallel(part, group=g, sequence_parallel=sp, vocab_start=r * part.shape[0])
        return part  # column_bias

    def __call__(self, path: str, decl: P, full: torch.Tensor) -> Any:
        return self.local(path, decl, full)


def tp_layout(model) -> TPLayout | None:
    """The :class:`TPLayout` of a tensor-parallel model, or None."""
    return model.shard if isinstance(model.shard, TPLayout) else None


# ============================================================================ the transform
def tp_size_problems(cfg, tp: int) -> list[str]:
    """Why ``cfg`` cannot be split over ``tp`` ranks (empty when it can); no process group needed,
    so scripts can check their flags before launching collectives."""
    problems = []
    if cfg.num_heads % tp:
        problems.append(f"num_heads {cfg.num_heads} is not divisible by tp={tp}")
    G = cfg.num_kv_heads
    if (G >= tp and G % tp) or (G < tp and tp % G):
        problems.append(f"num_kv_heads {G} and tp={tp}: one must divide the other")
    if cfg.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size {cfg.ffn_hidden_size} is not divisible by tp={tp}")
    if cfg.padded_vocab_size % tp:
        problems.append(f"padded vocab {cfg.padded_vocab_size} is not divisible by tp={tp} "
                        f"(set ModelConfig.pad_vocab_to to a multiple of {tp})")
    return problems


def tensor_parallel(model, mesh: Mesh, sequence_parallel: bool = False):
    """Split ``model`` over the mesh's ``tp`` dimension.

    Args:
      model: a :class:`~pmodel.model.Model` (no other sharding hook applied yet).
      mesh: the :class:`Mesh`; its ``tp`` group carries the communication.
      sequence_parallel: keep activations sharded on the sequence between TP regions (needs
        ``tp > 1`` and a sequence length divisible by ``tp``).

    Returns:
      a new Model whose ``shard`` hook makes :func:`pmodel.init` create only local shards (equal
      to slicing the full keyed draw) and whose functions communicate through the wrappers.

    Raises:
      ValueError: when a size does not divide (heads, kv heads, MLP width, padded vocab) or
        sequence parallel is asked for with ``tp == 1``.
    """
    cfg = model.config
    tp = mesh.size("tp")
    if sequence_parallel and tp == 1:
        raise ValueError("sequence parallel needs tensor parallel size > 1 (it shards the sequence over the TP group)")
    if model.shard is not None:
        raise ValueError(f"tensor_parallel must be the first sharding transform; model already has "
                         f"shard hook {model.shard!r} (transforms {model.transforms})")
    if tp == 1:
        return model.replace(transforms=model.transforms + ("tensor_parallel",))
    problems = tp_size_problems(cfg, tp)
    if problems:
        raise ValueError("tensor_parallel: " + "; ".join(problems))

    layout = TPLayout(mesh=mesh, sequence_parallel=bool(sequence_parallel), num_heads=cfg.num_heads,
                      num_kv_heads=cfg.num_kv_heads)
    for path, decl in tree.paths(model.defs, is_leaf=is_decl):
        layout.role(path, decl)  # raise now, not at init, for an unsupported declaration
    lora_roles = _lora_roles(model.defs, layout)  # {node path: role of its base}
    layout = dataclasses.replace(layout, lora_nodes=frozenset(lora_roles))
    # Within a layer, by relative path ("attn.q_proj.weight"): every layer has the same roles.
    rel_roles: dict[str, str] = {}
    for path, role in lora_roles.items():
        rel = path.split(".", 2)[2]
        if rel_roles.setdefault(rel, role) != role:
            raise NotImplementedError(f"tensor_parallel: LoRA at {path} has base role {role}, another layer's "
                                      f"{rel} has {rel_roles[rel]}")
    group, rank, H = layout.group, layout.rank, cfg.num_heads
    sp = bool(sequence_parallel)
    kv_slot = layout._kv_slot() if cfg.num_kv_heads < tp else None
    inner = model

    def wrap_lora(p):
        """Put the parallel wrapper around each LoRA node of a layer's params (outermost)."""
        def go(rel, n):
            if not is_lora(n):
                return n
            role = rel_roles.get(rel)
            if role is None:
                raise ValueError(f"tensor_parallel: the layer params hold a LoRA at {rel} that the model does "
                                 f"not declare (adapted: {sorted(rel_roles)})")
            if role in ("column", "kv_replica"):
                return ColumnParallel(n, group=group, sequence_parallel=sp,
                                      replica=kv_slot if role == "kv_replica" else None)
            if role == "row":
                return RowParallel(n, group=group, sequence_parallel=sp)
            return n  # replicated base: computes locally (SP syncs its factors' grads)
        return tree.map_with_path(go, p, is_leaf=is_lora)

    def local_ctx(ctx):
        if ctx.cache is not None:
            raise NotImplementedError("tensor_parallel: KV-cache decoding is not supported under TP yet "
                                      "(the cache is allocated for all KV heads)")
        if ctx.alibi is not None and ctx.alibi.shape[1] == H:
            # The context holds every head's ALiBi bias; this rank runs heads [r*H/tp, (r+1)*H/tp).
            n = H // tp
            ctx = dataclasses.replace(ctx, alibi=ctx.alibi[:, rank * n:(rank + 1) * n])
        return ctx

    def embed(params, tokens, ctx):
        h = inner.embed(params, tokens, local_ctx(ctx))  # (B, T, D), replicated
        if sequence_parallel:
            if h.shape[1] % tp:
                raise ValueError(f"sequence parallel: sequence length {h.shape[1]} is not divisible by tp={tp}")
            h = comm.scatter_to_sequence(h, group, 1)  # (B, T/tp, D)
        return h

    def block(p, h, ctx, layer):
        return inner.block(wrap_lora(p) if rel_roles else p, h, local_ctx(ctx), layer)

    def head(params, h, ctx):
        return inner.head(params, h, local_ctx(ctx))

    def head_loss(params, h, labels, weights, ctx):
        return inner.head_loss(params, h, labels, weights, local_ctx(ctx))

    return model.replace(embed=embed, block=block, head=head, head_loss=head_loss, shard=layout,
                         transforms=model.transforms + ("tensor_parallel",))


_LORA_FACTOR_ROLES = {  # base role -> (role of a, role of b)
    "column": ("replicated", "column"),
    "kv_replica": ("replicated", "kv_replica"),
    "row": ("row", "replicated"),
    "replicated": ("replicated", "replicated"),
}


def _lora_roles(defs, layout: TPLayout) -> dict[str, str]:
    """``{LoRA node path: role of its base}``, checking the factors' roles fit the base's."""
    out = {}
    for path, node in tree.paths(defs, is_leaf=lambda x: is_lora(x) or is_decl(x)):
        if not is_lora(node):
            continue
        base = layout.role(path + ".base", node.base)
        got = (layout.role(path + ".a", node.a), layout.role(path + ".b", node.b))
        want = _LORA_FACTOR_ROLES.get(base)
        if want != got:
            raise NotImplementedError(
                f"tensor_parallel: LoRA at {path}: base role {base!r} with factor roles {got} (a axes "
                f"{node.a.axes}, b axes {node.b.axes}) is not supported; a column / row / replicated base "
                f"needs factor roles {want or _LORA_FACTOR_ROLES}")
        if not path.startswith("layers.") and base != "replicated":
            raise NotImplementedError(f"tensor_parallel: LoRA outside the decoder layers ({path}) is not supported")
        out[path] = base
    return out


def shard_params(model, full_params) -> Any:
    """Cut this rank's leaves out of a full params tree (e.g. from :func:`pmodel.load_hf`).

    Gives the same leaves as ``pmodel.init(model, seed)`` would from the same full values.
    """
    layout = tp_layout(model)
    if layout is None:
        return full_params

    def cut(path, decl):
        full = tree.get(full_params, path).detach()
        leaf = layout.local(path, decl, full)
        return tree.map(lambda x: x.detach().clone().requires_grad_(decl.trainable and x.is_floating_point()), leaf)

    return tree.map_with_path(cut, model.defs, is_leaf=is_decl)


def sequence_parallel_paths(model) -> list[str]:
    """Paths of replicated parameters used on sequence shards (their grads need a TP all-reduce).

    Everything replicated except what runs before the scatter in ``embed`` (position embeddings,
    the embedding norm): norm weights / biases in the blocks and the final norm, row-parallel biases.
    """
    layout = tp_layout(model)
    if layout is None or not layout.sequence_parallel:
        return []
    out = []
    for path, decl in tree.paths(model.defs, is_leaf=is_decl):
        if layout.role(path, decl) == "replicated" and path.split(".")[0] not in ("pos_embed", "embed_norm"):
            out.append(path)
    return out


def replicated_grad_paths(model) -> list[str]:
    """Paths of replicated parameters whose per-rank gradient is only a part of the sum over TP.

    :func:`sequence_parallel_paths` under sequence parallel, plus the replicated LoRA factor of
    every adapted TP projection: ``a`` of a column-parallel base (rank ``r``'s gradient flows only
    through its rows of ``b``) and ``b`` of a row-parallel base (only through its columns of
    ``a``). In defs order.
    """
    layout = tp_layout(model)
    if layout is None:
        return []
    partial = set(sequence_parallel_paths(model))
    for path, role in _lora_roles(model.defs, layout).items():
        if role in ("column", "kv_replica"):
            partial.add(path + ".a")
        elif role == "row":
            partial.add(path + ".b")
    return [p for p, _ in tree.paths(model.defs, is_leaf=is_decl) if p in partial]


@torch.no_grad()
def sync_replicated_grads(model, params) -> None:
    """All-reduce over TP the gradients (``.grad``) of :func:`replicated_grad_paths`, in one flat
    buffer. A no-op when there are none (no sequence parallel, no LoRA).

    Call once after backward (after the last micro-batch; before or after the data-parallel
    reduction: both are sums). Calling it twice would double those gradients.
    """
    layout = tp_layout(model)
    paths = replicated_grad_paths(model)
    if not paths:
        return
    grads = [tree.get(params, p).grad for p in paths]
    live = [g for g in grads if g is not None]
    if not live:
        return
    flat = torch.cat([g.reshape(-1).float() for g in live])
    flat = comm.all_reduce(flat, layout.group)
    off = 0
    for g in live:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n


def sync_sequence_parallel_grads(model, params) -> None:
    """The earlier name of :func:`sync_replicated_grads` (which also covers LoRA factors)."""
    sync_replicated_grads(model, params)
