"""Tensor and sequence parallelism as a Model transform.

:func:`tensor_parallel` extends the model's :class:`~pmodel.parallel.layout.Layout` with the
rules :data:`~pmodel.parallel.layout.TP_RULES` (``heads, kv_heads, mlp, vocab -> tp``); each
parameter's role follows from where ``tp`` falls among its logical axes (``[out, in]`` layout):

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
it reads local head counts from the weights it receives. They implement the weight protocol
(:mod:`pmodel.ops.weights`) and hold either a tensor or another wrapper, whose type they never
inspect.

When ``kv_heads < tp`` each K/V head is replicated on ``tp / kv_heads`` consecutive ranks (those
whose query heads use it; the layout's ``units``). Each replica receives only its own query
heads' share of the gradient, so the wrapper sums the K/V weight (and bias) gradients over the
replicas in backward — through ``map_rows`` for a wrapped weight.

**Composite weights** (wrapper nodes in the declarations, e.g. ``LoRA(P, P, P)`` from
``tensor_parallel(lora(model), mesh)``): each child is cut by its own axes (LoRA's ``a`` is
``("lora_rank", in_axis)``, ``b`` is ``(out_axis, "lora_rank")``), and the composite's role is
that of its sharded matrix children (all must agree; the others must be replicated). The params
keep the single-process structure (local shards inside, same paths, so checkpoints, adapter
export and dropout keys are unchanged) and the transformed ``block`` wraps each composite as
``ColumnParallel(node)`` / ``RowParallel(node)`` when it runs: the parallel wrapper is outermost
and owns the communication, the composite computes on local shards. A row-parallel composite's
partial products join the one reduction (the sum is linear), and the wrapper passes
``in_shard`` so a composite that depends on the full input (LoRA dropout) can behave as on one
process. A replicated child of a sharded composite (LoRA's ``a`` under a column base, ``b``
under a row base) gets only this rank's part of its gradient: the transform contributes a
``GradReduction`` that all-reduces it over TP after backward.

**Sequence parallel** (``sequence_parallel=True``) keeps the residual stream ``(B, T/tp, D)``
sharded on the sequence between TP regions: column layers all-gather the sequence before their
matmul (backward: reduce-scatter), row layers reduce-scatter their partial sums (backward:
all-gather), and norms run on the shards. Replicated parameters used on the shards (norm weights,
row-parallel biases) then hold only their shard's gradient: sequence parallel contributes their
all-reduce over TP to the layout, which :func:`sync_replicated_grads` (``layout.sync_grads``) runs
after backward, in the same flat buffer as the composites' reductions.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .. import ops, tree
from ..ops.weights import WeightWrapper, is_wrapper, map_rows
from ..params import is_decl
from . import comm
from .layout import TP_RULES, GradReduction, Layout, Placement, Wrapping, layout_of, shard_params, sync_replicated_grads
from .mesh import Mesh

# shard_params / sync_replicated_grads / layout_of are defined in layout.py (they work for any
# layout); they are importable from here too, next to the transform that builds TP layouts.
__all__ = [
    "ColumnParallel", "RowParallel", "VocabParallel", "tensor_parallel", "tp_size_problems",
    "layout_of", "shard_params", "sync_replicated_grads",
]

# Roles whose (2-d) leaves the TP transform wraps; within a composite, the children each role allows.
_WRAPPED = ("column", "kv_replica", "row", "vocab")
_COMPOSITE_CHILDREN = {
    "column": {"column", "column_bias", "replicated"},
    "kv_replica": {"kv_replica", "kv_replica_bias", "replicated"},
    "row": {"row", "column_bias", "replicated"},
    "replicated": {"replicated"},
}


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
class _Parallel(WeightWrapper):
    """Base for the parallel wrappers: one local weight (a tensor or an inner wrapper) plus
    static communication info."""

    _STATIC: tuple[str, ...] = ("group", "sequence_parallel")

    def __init__(self, shard, *, group, sequence_parallel: bool):
        self.shard = shard
        self.group = group
        self.sequence_parallel = bool(sequence_parallel)

    @property
    def shape(self):  # local shape (what this rank stores)
        return tuple(self.shard.shape)

    def main_tensor(self):
        return self.shard  # a tensor, or a wrapper reporting its own dtype / device

    def map_rows(self, f):
        out = copy.copy(self)
        out.shard = map_rows(self.shard, f)
        return out

    def _no_in_shard(self, in_shard):
        if in_shard is not None:
            raise NotImplementedError(f"{type(self).__name__}: an input already split over columns "
                                      f"(in_shard={in_shard}) cannot be split again by tensor parallelism")

    def _enter(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (or, under SP, sequence-sharded) input -> full input of a TP region."""
        if self.sequence_parallel:
            return comm.gather_from_sequence(x, self.group, 1, reduce_grad=True)  # (B, T, D)
        return comm.copy_to_tp(x, self.group)

    def __repr__(self):
        return f"{type(self).__name__}({self.shard!r} {tuple(self.shape)}, sp={self.sequence_parallel})"


class ColumnParallel(_Parallel):
    """``[out/tp, in]`` rows of a column-parallel weight.

    ``replica = (slot, slots)`` marks a replicated K/V projection (``kv_heads < tp``): the local
    rows are the whole head ``slot`` of ``slots`` and gradients are summed over its copies.
    """

    _STATIC = ("group", "sequence_parallel", "replica")

    def __init__(self, shard, *, group, sequence_parallel, replica: tuple[int, int] | None = None):
        super().__init__(shard, group=group, sequence_parallel=sequence_parallel)
        self.replica = replica

    def _sync(self, t):
        if self.replica is None or t is None or not t.requires_grad:
            return t
        return _SumOverReplicas.apply(t, self.group, *self.replica)

    def linear(self, x, bias=None, *, kernels=None, in_shard=None):
        self._no_in_shard(in_shard)
        # Replicated K/V: attach the replica gradient sum to every row-indexed tensor of the
        # weight (a wrapper inside, e.g. LoRA, says which through map_rows). A wrapper inside
        # sees the full input, so e.g. LoRA's dropout mask is the single-process one.
        w = self.shard if self.replica is None else map_rows(self.shard, self._sync)
        if self.sequence_parallel and kernels is not None and kernels.mc2:
            # All-gather of the sequence + matmul as one op (torch_npu's MC2 kernel on NPU).
            y = ops.all_gather_linear(x, w, self.group, kernels=kernels)  # (B, T, out/tp)
            return y if bias is None else y + self._sync(bias)
        x = self._enter(x)  # (B, T, in) full sequence
        return ops.linear(x, w, self._sync(bias), kernels=kernels)  # (B, T, out/tp)


class RowParallel(_Parallel):
    """``[out, in/tp]`` columns of a row-parallel weight; reduces the partial sums itself."""

    def linear(self, x, bias=None, *, kernels=None, in_shard=None):
        self._no_in_shard(in_shard)
        # x: (B, T, in/tp), this rank's input columns [r * n, (r + 1) * n) of in = n * tp. A
        # wrapper inside computes its partial sum on them (LoRA: (x_r A_rᵀ) Bᵀ joins the one
        # reduction below) and gets in_shard to act as if it saw the full input where needed.
        n, r, t = x.shape[-1], comm.group_rank(self.group), comm.group_size(self.group)
        if self.sequence_parallel and kernels is not None and kernels.mc2:
            # matmul + reduce-scatter of the sequence as one op (torch_npu's MC2 kernel on NPU).
            y = ops.linear_reduce_scatter(x, self.shard, self.group, kernels=kernels,
                                          in_shard=(r * n, n * t))  # (B, T/tp, out)
            return y if bias is None else y + bias
        y = ops.linear(x, self.shard, kernels=kernels, in_shard=(r * n, n * t))  # (B, T, out) partial
        if self.sequence_parallel:
            y = comm.reduce_scatter_to_sequence(y, self.group, 1)  # (B, T/tp, out)
        else:
            y = comm.reduce_from_tp(y, self.group)
        # The bias is replicated: add it once, after the reduction.
        return y if bias is None else y + bias


class VocabParallel(_Parallel):
    """``[V/tp, D]`` rows (``[lo, lo + V/tp)``) of the embedding / output matrix."""

    _STATIC = ("group", "sequence_parallel", "vocab_start")

    def __init__(self, shard, *, group, sequence_parallel, vocab_start: int):
        super().__init__(shard, group=group, sequence_parallel=sequence_parallel)
        self.vocab_start = int(vocab_start)

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

    def linear(self, x, bias=None, *, kernels=None, in_shard=None):
        self._no_in_shard(in_shard)
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


def _register(cls):
    def children(obj):
        return [obj.shard], tuple(getattr(obj, n) for n in cls._STATIC)

    def rebuild(kids, static):
        obj = cls.__new__(cls)
        obj.shard = kids[0]
        for name, value in zip(cls._STATIC, static):
            setattr(obj, name, value)
        return obj

    tree.register_node(cls, children, rebuild, ("shard",))


for _cls in (ColumnParallel, RowParallel, VocabParallel):
    _register(_cls)


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


# ============================================================================ the transform
def _tp_wrapping(group, sequence_parallel: bool) -> Wrapping:
    """TP's contribution to the layout: 2-d column / row / vocab leaves split over tp only."""
    sp = bool(sequence_parallel)

    def claims(spec: Placement) -> bool:
        return (spec.composite is None and len(spec.shape) == 2 and spec.role in _WRAPPED
                and all(d in (None, "tp") for d in spec.dims))

    def wrap(spec: Placement, t: torch.Tensor):
        if spec.role in ("column", "kv_replica"):
            return ColumnParallel(t, group=group, sequence_parallel=sp, replica=spec.replica)
        if spec.role == "row":
            return RowParallel(t, group=group, sequence_parallel=sp)
        return VocabParallel(t, group=group, sequence_parallel=sp, vocab_start=spec.index[0].start)

    return Wrapping(name="tensor_parallel", claims=claims, wrap=wrap)


def _moe_stats_over(group):
    """Sum an MoE layer's additive router statistics over ``group`` in one all-reduce (backward:
    identity); the count entries stay detached."""
    def reduce(stats: dict) -> dict:
        keys = list(stats)
        sizes = [stats[k].numel() for k in keys]
        flat = comm.reduce_from_tp(torch.cat([stats[k].float().reshape(-1) for k in keys]), group)
        out = {}
        for k, part in zip(keys, flat.split(sizes)):
            part = part.view_as(stats[k])
            out[k] = part if stats[k].requires_grad else part.detach()
        return out
    return reduce


def _composite_roles(defs, layout: Layout) -> dict[str, tuple[str, tuple | None, list[str]]]:
    """``{composite path: (role, replica, replicated child paths)}``, checking that its children's
    roles fit one role (the sharded matrix children agree; the others are replicated)."""
    out = {}
    for path, node in tree.paths(defs, is_leaf=lambda x: is_decl(x) or is_wrapper(x)):
        if not is_wrapper(node):
            continue
        specs = {f"{path}.{sub}": layout.placement(f"{path}.{sub}", d) for sub, d in tree.paths(node, is_leaf=is_decl)}
        roles = {p: s.role for p, s in specs.items()}
        matrix = {r for r in roles.values() if r in _WRAPPED}
        if len(matrix) > 1 or "vocab" in matrix:
            raise NotImplementedError(f"tensor_parallel: composite weight {type(node).__name__} at {path} has "
                                      f"children with roles {roles}; one column / row role is supported")
        role = matrix.pop() if matrix else "replicated"
        bad = {p: r for p, r in roles.items() if r not in _COMPOSITE_CHILDREN[role]}
        if bad:
            raise NotImplementedError(f"tensor_parallel: composite weight {type(node).__name__} at {path}: a {role} "
                                      f"composite allows children {sorted(_COMPOSITE_CHILDREN[role])}, got {bad}")
        if role != "replicated" and not path.startswith("layers."):
            raise NotImplementedError(f"tensor_parallel: a sharded composite weight outside the decoder layers "
                                      f"({path}) is not supported")
        replica = next((s.replica for s in specs.values() if s.replica is not None), None)
        out[path] = (role, replica, [p for p, r in roles.items() if r == "replicated"])
    return out


def tensor_parallel(model, mesh: Mesh, sequence_parallel: bool = False):
    """Split ``model`` over the mesh's ``tp`` dimension.

    Args:
      model: a :class:`~pmodel.model.Model`, possibly already carrying a layout from another
        sharding transform on the same mesh (its rules must not contradict :data:`TP_RULES`).
      mesh: the :class:`Mesh`; its ``tp`` group carries the communication.
      sequence_parallel: keep activations sharded on the sequence between TP regions (needs
        ``tp > 1`` and a sequence length divisible by ``tp``).

    Returns:
      a new Model whose ``layout`` makes :func:`pmodel.init` create only local shards (equal to
      slicing the full keyed draw) and holds the after-backward gradient work, and whose
      functions communicate through the wrappers. With ``tp == 1`` the model is unchanged.

    Raises:
      ValueError: when a size does not divide (heads, kv heads, MLP width, padded vocab),
        sequence parallel is asked for with ``tp == 1``, or the transform is applied twice.
      NotImplementedError: a declaration split over tp that no transform wraps (e.g. a 3-d
        expert weight without an expert-parallel transform) or an unsupported composite.
    """
    cfg = model.config
    tp = mesh.size("tp")
    if sequence_parallel and tp == 1:
        raise ValueError("sequence parallel needs tensor parallel size > 1 (it shards the sequence over the TP group)")
    if "tensor_parallel" in model.transforms:
        raise ValueError(f"tensor_parallel is already applied (transforms {model.transforms})")
    if tp == 1:
        return model.replace(transforms=model.transforms + ("tensor_parallel",))
    if sequence_parallel and cfg.num_experts and cfg.moe_capacity_factor is not None:
        raise NotImplementedError("tensor_parallel: sequence parallel with an MoE capacity factor: each rank would "
                                  "apply the capacity to its sequence shard, not to the whole forward's tokens; "
                                  "use dropless (moe_capacity_factor=None) or sequence_parallel=False")
    problems = tp_size_problems(cfg, tp)
    if problems:
        raise ValueError("tensor_parallel: " + "; ".join(problems))
    base = layout_of(model) or Layout(mesh=mesh)
    if base.mesh is not mesh:
        raise ValueError("tensor_parallel: the model's layout was built for another mesh")
    group, rank, H, sp = mesh.group("tp"), mesh.rank("tp"), cfg.num_heads, bool(sequence_parallel)
    layout = base.extend(rules=TP_RULES, units={"heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads},
                         wrappings=(_tp_wrapping(group, sp),))
    comps = _composite_roles(model.defs, layout)
    layout = layout.extend(composites=comps)

    # Every leaf: its placement (raises on sizes that do not divide), and for one split over tp a
    # transform that wraps it (a leaf split only over another dim is that transform's business).
    replicated = []
    for path, decl in tree.paths(model.defs, is_leaf=is_decl):
        spec = layout.placement(path, decl)
        if spec.role == "replicated":
            replicated.append(path)
        if spec.composite is not None or len(spec.shape) == 1 or "tp" not in spec.dims:
            continue  # wrapped with its composite / the bias of a wrapped weight / not split over tp
        if not any(w.claims(spec) for w in layout.wrappings):
            raise NotImplementedError(f"tensor_parallel: {path} (axes {decl.axes}) is split over "
                                      f"{[d for d in spec.dims if d]} but no transform wraps it")

    # After-backward work: replicated children of sharded composites hold partial gradients;
    # under SP so do replicated leaves used on sequence shards (all but what runs before the
    # scatter in `embed`: position embeddings and the embedding norm).
    reductions = [GradReduction(name="composite_replicated", dim="tp",
                                paths=[p for role, _, reps in comps.values() if role != "replicated" for p in reps])]
    if sp:
        reductions.append(GradReduction(name="sequence_parallel", dim="tp", paths=[
            p for p in replicated if p.split(".")[0] not in ("pos_embed", "embed_norm")]))
    layout = layout.extend(reductions=tuple(r for r in reductions if r.paths))

    # Within a layer, by relative path ("attn.q_proj.weight"): every layer has the same roles.
    rel_roles: dict[str, tuple[str, tuple | None]] = {}
    for path, (role, replica, _) in comps.items():
        if not path.startswith("layers."):
            continue
        rel = path.split(".", 2)[2]
        if rel_roles.setdefault(rel, (role, replica)) != (role, replica):
            raise NotImplementedError(f"tensor_parallel: composite at {path} has role {role}, another layer's "
                                      f"{rel} has {rel_roles[rel][0]}")
    inner = model

    def wrap_composites(p):
        """Put the parallel wrapper around each composite weight of a layer's params (outermost)."""
        def go(rel, n):
            if not is_wrapper(n) or isinstance(n, _Parallel):
                return n
            if rel not in rel_roles:
                raise ValueError(f"tensor_parallel: the layer params hold a {type(n).__name__} at {rel} that the "
                                 f"model does not declare (composites: {sorted(rel_roles)})")
            role, replica = rel_roles[rel]
            if role in ("column", "kv_replica"):
                return ColumnParallel(n, group=group, sequence_parallel=sp, replica=replica)
            if role == "row":
                return RowParallel(n, group=group, sequence_parallel=sp)
            return n  # replicated: computes locally (SP syncs its children's grads)
        return tree.map_with_path(go, p, is_leaf=is_wrapper)

    def local_ctx(ctx):
        if ctx.cache is not None and sequence_parallel:
            # The cache itself works under TP (each rank caches its own KV heads: allocate it with
            # the local head count, as pmodel.inference does); sequence parallel cannot split a
            # one-token decode step over the TP ranks.
            raise NotImplementedError("tensor_parallel: KV-cache decoding with sequence_parallel=True: a decode "
                                      "step of one token cannot be split over the sequence; build the inference "
                                      "model without sequence parallel")
        if sequence_parallel and cfg.num_experts and ctx.moe_stats_reduce is None:
            # The MoE layer sees this rank's sequence shard: its router statistics are summed
            # over TP before the per-layer terms (forward all-reduce, backward identity: every
            # rank computes the same auxiliary loss from the totals), and only this shard's
            # padding flags count.
            valid = ctx.token_valid
            if valid is not None:
                valid = valid.chunk(tp, dim=1)[rank]
            ctx = dataclasses.replace(ctx, token_valid=valid, moe_stats_reduce=_moe_stats_over(group))
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
        return inner.block(wrap_composites(p) if rel_roles else p, h, local_ctx(ctx), layer)

    def head(params, h, ctx):
        return inner.head(params, h, local_ctx(ctx))

    def head_loss(params, h, labels, weights, ctx):
        return inner.head_loss(params, h, labels, weights, local_ctx(ctx))

    return model.replace(embed=embed, block=block, head=head, head_loss=head_loss, layout=layout,
                         transforms=model.transforms + ("tensor_parallel",))
