"""``parallelize``: one training step for every layout.

``plan = parallelize(model, tx, mesh, pipeline=..., sequence_parallel=..., ...)`` composes tensor /
sequence parallelism (:func:`~pmodel.parallel.tensor.tensor_parallel`), pipeline stages
(:func:`~pmodel.parallel.pipeline.pipeline`), data-parallel gradient buckets
(:class:`~pmodel.parallel.data.DataParallel`), the optimizer layout (plain with fp32 main weights
for bf16/fp16 params, or the distributed ZeRO-1 / replica optimizer of
:mod:`pmodel.parallel.zero`) and dynamic loss scaling, and returns a :class:`ParallelPlan` whose

    ``plan.step(params, opt_state, micro_batches) -> (params, opt_state, metrics)``

has the contract of the single-process :func:`pmodel.train.train_step` (which *is* this plan on a
one-rank mesh). ``micro_batches`` are this data-parallel rank's micro-batches of one global batch;
the loss is the mean over every counted token of the global batch, so every layout computes the
same step as one process on the whole batch.

One tail for every layout (:meth:`ParallelPlan._update`): the gradients this rank owns (the
whole local gradients, or the distributed optimizer's shard pieces) enter one global-norm
computation, weighted by the layout (a leaf replicated over TP counts once) and summed over the
mesh dimensions that hold different pieces; the norm decides loss-scale overflow (every rank
agrees: the norm is all-reduced), unscaling and clipping are one coefficient, then the optimizer
updates.

Every option takes effect or raises with the reason (no silent no-ops):

* ``sequence_parallel`` needs ``tp > 1``;
* ``distributed_optimizer`` with ``dp == 1`` warns (``UserWarning``) that nothing is sharded: it
  still runs (an fp32 main copy of the params and the same update), as Megatron's flag does;
* ``high_availability`` (replica optimizer) needs ``distributed_optimizer`` and an even ``dp >= 2``;
* ``overlap_grad_reduce`` needs ``dp > 1`` and no pipeline (the pipeline interleaves micro-batch
  backwards, so a bucket is complete only when the schedule ends);
* the optimizer must not clip by global norm itself (it would see only local shards): pass
  ``max_grad_norm``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple

import torch

from .. import optim, tree
from ..model import count_tokens
from ..optim import GradientTransformation, apply_updates
from ..precision import LossScaleState, Policy, init_loss_scale, mixed_precision, next_loss_scale
from . import comm
from .data import DataParallel
from .mesh import Mesh
from .optimizer import norm_weights
from .pipeline import Pipeline, _moe_metric_sums, pipeline as _pipeline
from .layout import layout_of, shard_params, sync_replicated_grads
from .tensor import tensor_parallel
from .zero import ShardSpec, shard_spec
from .zero import distributed_optimizer as distributed_optimizer_tx

__all__ = ["PipelineSpec", "PlanState", "ParallelPlan", "parallelize", "layout_problems", "single", "rank_specs",
           "offline_mesh"]

# Megatron's default bucket: about 40M gradient scalars per reduction.
BUCKET_NUMEL = 40_000_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineSpec:
    """How to cut the model into pipeline stages over the mesh's ``pp`` dimension.

    Attributes:
      schedule: ``"1f1b"``, ``"interleaved"`` (needs ``virtual_stages >= 2``) or ``"zero-bubble"``.
      layers_per_stage: per-stage layer counts (uneven split), or None for an even split.
      virtual_stages: model chunks per rank (interleaved schedule).
    """

    schedule: str = "1f1b"
    layers_per_stage: tuple | None = None
    virtual_stages: int = 1


class PlanState(NamedTuple):
    """The optimizer state of a plan.

    Attributes:
      inner: the optimizer's state (mixed precision or distributed optimizer around ``tx``).
      loss_scale: :class:`~pmodel.precision.LossScaleState` (fp16) or ``EmptyState``.
      count: optimizer steps taken (int64), which numbers the micro-batches for the hook.
    """

    inner: Any
    loss_scale: Any
    count: torch.Tensor


def _device_of(params) -> torch.device:
    for x in tree.leaves(params):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ParallelPlan:
    """A parallelised model + optimizer and the train step that drives them.

    Build with :func:`parallelize`. Attributes:
      model: the tensor-parallel Model (the whole model's functions and declarations).
      stage_model: ``model`` restricted to this rank's pipeline stage (its ``defs`` are exactly
        the leaves :meth:`init` creates); equal to ``model`` without a pipeline.
      pipe: the :class:`~pmodel.parallel.pipeline.Pipeline`, or None.
      mesh: the :class:`Mesh`.
      policy: the precision :class:`~pmodel.precision.Policy`.
      tx: the optimizer as the plan runs it (``tx.init(params)`` gives a :class:`PlanState`;
        its ``update`` is not called directly: :meth:`step` owns the update).
      inner_tx: the optimizer layout around the user's ``tx`` (mixed precision with fp32 main
        weights, or the distributed optimizer).
      zero: the distributed optimizer's :class:`~pmodel.parallel.zero.ShardSpec`, or None.
      max_grad_norm: global-norm clip (None = off).
      overlap_grad_reduce, bucket_numel: data-parallel reduction settings.
      micro_batch_hook: ``(params, index) -> params`` applied to the params for every micro-batch
        (``index`` numbers the global batch's micro-batches over the whole run, in the data
        order; ``None`` during evaluation), e.g. binding LoRA dropout keys.
      deterministic: data-parallel gradient sums and the global loss / norm sums run in a fixed
        rank order (see :class:`~pmodel.parallel.data.DataParallel`), not the backend's.
    """

    model: Any
    stage_model: Any
    pipe: Pipeline | None
    mesh: Mesh
    policy: Policy
    tx: GradientTransformation
    inner_tx: GradientTransformation
    zero: ShardSpec | None
    max_grad_norm: float | None
    overlap_grad_reduce: bool
    bucket_numel: int
    micro_batch_hook: Callable | None = None
    deterministic: bool = False
    _buckets: dict = dataclasses.field(default_factory=dict, repr=False)
    _progress: dict = dataclasses.field(default_factory=lambda: {"phase": "idle"}, repr=False)

    @property
    def phase(self) -> str:
        """Where the last :meth:`step` is or stopped: ``"compute"`` (forward / backward / gradient
        reduction: params and optimizer state untouched), ``"update"`` (the optimizer is changing
        its state and the params: an exception here leaves them partly updated) or ``"idle"``
        (no step running; the last one completed). :mod:`pmodel.resilience` reads it to know
        whether a failed step left this rank's state clean."""
        return self._progress["phase"]

    # ------------------------------------------------------------------ params
    @property
    def distributed(self) -> bool:
        return self.zero is not None

    @property
    def is_lead(self) -> bool:
        """Global rank 0 (logs, writes metrics)."""
        return self.mesh.global_rank == 0

    def init(self, seed: int = 0, *, device: Any = None) -> Any:
        """This rank's params (TP shards of its stage's leaves), equal to slicing
        ``pmodel.init(model, seed)`` of the single-process model."""
        from ..params import init as init_params
        return init_params(self.stage_model, seed, device=device)

    def shard(self, full_params) -> Any:
        """This rank's params cut from a full single-process params tree (e.g. ``load_hf``)."""
        local = shard_params(self.model, full_params)
        return self.pipe.stage_params(local) if self.pipe is not None else local

    def data_parallel(self, params) -> DataParallel:
        """The gradient buckets for ``params`` (created on first use and kept)."""
        key = id(params)
        dp = self._buckets.get(key)
        if dp is None:
            self._buckets.clear()  # one live params tree per plan
            reduce = "reduce_scatter" if self.zero is not None and not self.zero.replica else "all_reduce"
            dp = DataParallel(params, self.mesh, bucket_numel=self.bucket_numel, overlap=self.overlap_grad_reduce,
                              reduce=reduce, deterministic=self.deterministic,
                              grad_dtype=torch.float32 if self.policy.grad_accum_fp32 else None)
            self._buckets[key] = dp
        return dp

    # ------------------------------------------------------------------ the step
    def step(self, params, opt_state: PlanState, micro_batches) -> tuple[Any, PlanState, dict]:
        """One optimizer step over this rank's micro-batches (gradient accumulation).

        Args:
          params: this rank's params (changed in place; the same tree is returned).
          opt_state: the :class:`PlanState` from ``plan.tx.init(params)``.
          micro_batches: a dict or a list of micro-batch dicts (``tokens``, ``labels`` already
            shifted, optional ``loss_mask``, ``position_ids``, ``attention_mask``, ``cu_seqlens``).

        Returns:
          ``(params, opt_state, metrics)``; metrics (Python numbers, equal on every rank):
          ``loss`` (global mean over counted tokens), ``num_tokens`` (counted, global),
          ``tokens`` / ``samples`` (processed, global), ``grad_norm`` (before clipping, NaN for a
          skipped step), ``lr``, ``loss_scale``, ``skipped``.
        """
        mbs = _micro_batches(micro_batches)
        dev = _device_of(params)
        self._progress["phase"] = "compute"
        dp = self.data_parallel(params)
        local = torch.tensor([sum(count_tokens(mb) for mb in mbs), sum(int(mb["tokens"].numel()) for mb in mbs),
                              sum(int(mb["tokens"].shape[0]) for mb in mbs)], dtype=torch.int64, device=dev)
        counts = comm.all_reduce(local, self.mesh.group("dp"))  # counted tokens, tokens, samples
        if self.mesh.size("ep") > 1:  # expert-parallel ranks see different tokens too
            counts = comm.all_reduce(counts, self.mesh.group("ep"))
        denom = counts[0].clamp(min=1)
        scale = float(opt_state.loss_scale.scale) if isinstance(opt_state.loss_scale, LossScaleState) else 1.0
        bind = self._binder(params, int(opt_state.count), len(mbs))
        moe = None  # MoE router metrics: token-weighted lb and z losses, dropped and routed pairs
        if self.pipe is not None:
            aux = self.pipe.forward_backward(params, mbs, num_tokens=denom, loss_scale=scale, bind=bind)[1]
            loss_sum, moe = aux["loss_sum"], aux.get("moe")
        else:
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            for j, mb in enumerate(mbs):
                with dp.no_sync() if j < len(mbs) - 1 else contextlib.nullcontext():
                    loss, aux = self.model.loss(bind(j) if bind else params, mb, num_tokens=denom)
                    (loss * scale if scale != 1.0 else loss).backward()
                loss_sum += aux["loss_sum"].double()
                if "moe_aux_loss" in aux:
                    part = _moe_metric_sums(aux).to(dev)
                    moe = part if moe is None else moe + part
        dp.finish()
        # The layout's after-backward work: partial gradients of replicated leaves (sequence
        # parallel norms and row biases, LoRA's replicated factors) are summed over TP.
        sync_replicated_grads(self.stage_model, params)
        loss_sum = self._sum(loss_sum.double().reshape(()).to(dev), self.mesh.group("dp"))
        if self.mesh.size("ep") > 1:
            loss_sum = self._sum(loss_sum, self.mesh.group("ep"))
        if moe is not None:
            moe = self._sum(moe.double().to(dev), self.mesh.group("dp"))
            if self.mesh.size("ep") > 1:
                moe = self._sum(moe, self.mesh.group("ep"))
        loss_finite = bool(torch.isfinite(loss_sum))  # the global sum: equal on every rank
        opt_state, norm, skipped = self._update(params, opt_state, dp, scale, loss_finite)
        n = int(counts[0])
        nonfinite = skipped and (not loss_finite or self.policy.loss_scale is None)
        metrics = {"loss": float(loss_sum) / max(n, 1), "num_tokens": n, "tokens": int(counts[1]),
                   "samples": int(counts[2]), "grad_norm": norm, "lr": optim.current_lr(opt_state),
                   "loss_scale": scale, "skipped": skipped, "nonfinite": nonfinite}
        if moe is not None:  # reported separately from the cross-entropy loss above
            metrics.update(moe_aux_loss=float(moe[0]), moe_z_loss=float(moe[1]), moe_dropped=int(moe[2]),
                           moe_routed_pairs=int(moe[3]))
        self._progress["phase"] = "idle"
        return params, opt_state, metrics

    def _sum(self, x: torch.Tensor, group) -> torch.Tensor:
        """Sum of a small float tensor over ``group``: the backend's all-reduce, or (deterministic)
        every rank's value gathered and added left to right in rank order."""
        if not self.deterministic or group is None:
            return comm.all_reduce(x, group)
        parts = comm.all_gather(x.reshape(1, -1), group, 0)  # (n, numel), rank order
        out = parts[0].clone()
        for j in range(1, parts.shape[0]):
            out += parts[j]
        return out.view(x.shape)

    def _binder(self, params, count: int, local_micro: int):
        """``j -> params`` for this rank's micro-batch ``j`` (None without a hook). Micro-batch
        ``j`` of dp rank ``r`` is the global batch's micro-batch ``j * dp + r`` (the data order of
        :class:`~pmodel.data.MicroBatchLoader`), numbered over the run."""
        hook = self.micro_batch_hook
        if hook is None:
            return None
        dpn, r = self.mesh.size("dp"), self.mesh.rank("dp")
        base = count * local_micro * dpn
        return lambda j: hook(params, base + j * dpn + r)

    def _norm_sq_groups(self):
        """The mesh groups the squared norm is summed over, in order, and a final divisor."""
        groups = []
        div = 1.0
        if self.zero is not None:
            groups.append(self.mesh.group("dp"))  # disjoint pieces over dp
            if self.zero.replica:
                div = 2.0  # every piece is held by two dp ranks
        layout = layout_of(self.stage_model)
        dims = layout.norm_dims if layout is not None else ()
        return groups + [self.mesh.group(d) for d in dims] + [self.mesh.group("pp")], div

    @torch.no_grad()
    def _update(self, params, state: PlanState, dp: DataParallel, scale: float, loss_finite: bool = True):
        """The one clip / unscale / update tail. Returns ``(state, grad_norm, skipped)``.

        A non-finite gradient norm or loss skips the update (params and optimizer state are left
        as they were): with fp16 loss scaling that is an overflow (the scale backs off), otherwise
        a numerical fault the loop counts (``metrics["nonfinite"]``)."""
        grads = dp.grads(params)
        owned = self.zero.pieces(grads, params) if self.zero is not None else grads
        weights = norm_weights(self.stage_model, params)
        skip = self._tied_copy_path()
        sq = torch.zeros((), dtype=torch.float64, device=_device_of(params))
        for (path, g), w in zip(tree.paths(owned, is_leaf=lambda x: x is None), weights):
            if g is not None and path != skip:
                sq = sq + w * g.detach().double().pow(2).sum()
        groups, div = self._norm_sq_groups()
        for i, g in enumerate(groups):
            sq = self._sum(sq, g)
            if i == 0 and div != 1.0:
                sq = sq / div
        norm = sq.sqrt().float()  # of the scaled gradients
        finite = bool(torch.isfinite(norm))
        ls = state.loss_scale
        if self.policy.loss_scale is not None:
            ls = next_loss_scale(self.policy.loss_scale, ls, finite)
            if not finite:  # every rank sees the same all-reduced norm: all skip together
                dp.zero_grad()
                return PlanState(inner=state.inner, loss_scale=ls, count=state.count + 1), float("nan"), True
        true_norm = norm / scale if scale != 1.0 else norm
        if not (finite and loss_finite):  # every rank sees the same global norm and loss: all skip
            dp.zero_grad()
            return PlanState(inner=state.inner, loss_scale=ls, count=state.count + 1), float(true_norm), True
        coef = None
        if self.max_grad_norm is not None:
            coef = torch.clamp(self.max_grad_norm / (true_norm + 1e-6), max=1.0)
        if scale != 1.0:
            coef = (coef if coef is not None else torch.ones((), device=norm.device)) / scale
        if coef is not None:
            # fp32: a mixed-precision optimizer then sees the unrounded clipped gradient.
            owned = tree.map(lambda g: None if g is None else g.float() * coef, owned, is_leaf=lambda x: x is None)
        self._progress["phase"] = "update"
        updates, inner = self.inner_tx.update(owned, state.inner, params)
        apply_updates(params, updates)
        dp.zero_grad()
        return PlanState(inner=inner, loss_scale=ls, count=state.count + 1), float(true_norm), False

    def _tied_copy_path(self) -> str | None:
        """The last stage's copy of a tied embedding: its gradient equals the first stage's (they
        are summed), so the global norm counts it once."""
        p = self.pipe
        if p is not None and self.model.config.tie_embeddings and p.is_last and not p.is_first:
            return "embed.weight"
        return None

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, params, batches, iters: int | None = None) -> dict:
        """Token-weighted mean loss over ``iters`` batches (all when None) of this rank's
        micro-batches; the result is global (summed over data-parallel ranks, from the last
        pipeline stage).

        Returns:
          ``{"loss", "ppl", "num_tokens", "batches"}``.
        """
        dev = _device_of(params)
        p_eval = self.micro_batch_hook(params, None) if self.micro_batch_hook is not None else params
        tot = torch.zeros(2, dtype=torch.float64, device=dev)
        k = 0
        for batch in batches:
            if iters is not None and k >= iters:
                break
            mbs = _micro_batches(batch)
            if self.pipe is not None:
                s, n = self.pipe.forward_only(p_eval, mbs)
                tot += torch.stack([s.double(), n.double()]).to(dev)
            else:
                for mb in mbs:
                    _, aux = self.model.loss(p_eval, mb)
                    tot += torch.stack([aux["loss_sum"].double(), aux["num_tokens"].double()]).to(dev)
            k += 1
        tot = self._sum(tot, self.mesh.group("dp"))
        n = int(tot[1])
        if n == 0:
            raise ValueError("evaluate: no counted tokens in the evaluation batches")
        loss = float(tot[0]) / n
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "num_tokens": n, "batches": k}

    # ------------------------------------------------------------------ checkpoints
    def leaf_specs(self, params) -> dict:
        """``{local params path: LeafSpec(global path, global shape, slices, primary)}`` for the
        reshardable checkpoint (:mod:`pmodel.checkpoint.sharded`)."""
        return _leaf_specs(self.stage_model, params, self._tied_copy_path())

    def save_checkpoint(self, root, step: int, params, opt_state, *, config: dict | None = None,
                        data: dict | None = None, extra: dict | None = None, keep_last: int | None = None,
                        writer=None):
        """Write a reshardable checkpoint of this rank's params and optimizer state (collective;
        with a :class:`~pmodel.checkpoint.sharded.Writer`, over the ranks it synchronises)."""
        from ..checkpoint import sharded
        return sharded.save(root, step, params=params, opt_state=opt_state, specs=self.leaf_specs(params),
                            piece_of=self.state_pieces(params), rank=self.mesh.global_rank,
                            world=self.mesh.world_size, mesh_sizes=dict(self.mesh.sizes), dp_rank=self.mesh.rank("dp"),
                            config=config, data=data, extra=extra, keep_last=keep_last, writer=writer)

    def load_checkpoint(self, root, params, opt_state, *, config: dict | None = None, path=None,
                        restore_rng_state: bool = True, cast_dtype: bool = False, verify: bool = True):
        """Fill ``params`` / ``opt_state`` (None: params only) from the latest checkpoint under
        ``root`` (any layout); ``(params, opt_state, manifest)`` or None when there is none
        (collective). ``restore_rng_state`` / ``cast_dtype`` / ``verify``: as
        :func:`pmodel.checkpoint.sharded.load`."""
        from ..checkpoint import sharded
        return sharded.load(root, params=params, opt_state=opt_state, specs=self.leaf_specs(params),
                            piece_of=self.state_pieces(params), rank=self.mesh.global_rank,
                            world=self.mesh.world_size, mesh_sizes=dict(self.mesh.sizes), config=config, path=path,
                            restore_rng_state=restore_rng_state, cast_dtype=cast_dtype, verify=verify)

    def state_pieces(self, params) -> Callable[[str, torch.Tensor], tuple | None]:
        """For the reshardable checkpoint: ``(param_path, tensor) -> flat range or None`` of an
        optimizer-state leaf that mirrors a param (distributed pieces are flat ranges of the
        local shard; anything else covers the whole local shard)."""
        if self.zero is None:
            return lambda path, t: None
        ranges = dict(zip([p for p, _ in tree.paths(params)], self.zero.ranges(params)))

        def piece(path: str, t: torch.Tensor):
            r = ranges.get(path)
            if r is None:
                return None
            _, _, in_leaf, n, _ = r
            return (in_leaf, in_leaf + n)
        return piece


def _leaf_specs(stage_model, params, tied_copy: str | None) -> dict:
    """``{local params path: LeafSpec}`` of a stage's params (``params=None``: keyed by the
    declarations' global paths)."""
    from ..checkpoint.sharded import LeafSpec
    from ..params import is_decl
    layout = layout_of(stage_model)
    decls = tree.paths(stage_model.defs, is_leaf=is_decl)
    local = [p for p, _ in tree.paths(params)] if params is not None else [n for n, _ in decls]
    if len(decls) != len(local):
        raise ValueError(f"leaf_specs: params have {len(local)} leaves, the stage declares {len(decls)}")
    # Leaves pair with declarations in order: plan.init and plan.shard (Pipeline.stage_params)
    # both build the stage tree in stage_defs order.
    out = {}
    for (name, decl), p in zip(decls, local):
        if layout is None:
            box, primary = [(0, n) for n in decl.shape], True
        else:
            sl = layout.leaf_slice(name, decl)
            box = [(s.start or 0, n if s.stop is None else s.stop) for s, n in zip(sl, decl.shape)]
            primary = layout.is_primary(name, decl)
        if tied_copy == name:
            primary = False  # the first stage writes the tied embedding
        out[p] = LeafSpec(name, decl.shape, box, primary)
    return out


def offline_mesh(sizes: dict, rank: int) -> Mesh:
    """The :class:`Mesh` rank ``rank`` would have on a mesh of ``sizes``, without process groups:
    for computing a layout's shards (checkpoint conversion), never for running a step."""
    from .mesh import DIMS
    full = {d: int(sizes.get(d, 1)) for d in DIMS}
    world = math.prod(full.values())
    coords = Mesh.coords_of(full, rank)
    return Mesh(sizes=full, global_rank=rank, world_size=world, coords=coords, groups={d: None for d in DIMS},
                group_ranks={d: () for d in DIMS}, backend="none")


def rank_specs(model, sizes: dict, *, pipeline: PipelineSpec | None = None) -> list[dict]:
    """Per global rank of a layout, ``{global param path: LeafSpec}`` of the leaves it holds and
    writes (what :meth:`ParallelPlan.leaf_specs` gives on that rank), computed in one process.

    Args:
      model: the plain Model.
      sizes: ``{"tp": .., "pp": .., "dp": ..}`` (missing dims are 1).
      pipeline: the stage split when pp > 1 (default: 1F1B, even split).

    Raises:
      ValueError: with the reasons of :func:`layout_problems`.
    """
    problems = layout_problems(model.config, sizes, pipeline=pipeline)
    if problems:
        raise ValueError("; ".join(problems))
    out = []
    first = offline_mesh(sizes, 0)
    for r in range(first.world_size):
        mesh = offline_mesh(sizes, r)
        if mesh.size("ep") > 1:
            from .expert import expert_parallel
            stage = tensor_parallel(expert_parallel(model, mesh), mesh)
        else:
            stage = tensor_parallel(model, mesh)
        tied = None
        if mesh.size("pp") > 1:
            spec = pipeline or PipelineSpec()
            pipe = _pipeline(stage, mesh, spec.schedule, microbatches=mesh.size("pp"),
                             layers_per_stage=spec.layers_per_stage, virtual_stages=spec.virtual_stages)
            stage = stage.replace(defs=pipe.stage_defs())
            if model.config.tie_embeddings and pipe.is_last and not pipe.is_first:
                tied = "embed.weight"
        specs = _leaf_specs(stage, None, tied)
        if mesh.rank("dp") != 0:  # data-parallel peers hold identical copies: dp rank 0 writes
            specs = {k: v.__class__(v[0], v[1], v[2], False) for k, v in specs.items()}
        out.append(specs)
    return out


def _micro_batches(batch) -> list[dict]:
    if isinstance(batch, dict):
        return [batch]
    mbs = list(batch)
    if not mbs or not all(isinstance(b, dict) for b in mbs):
        raise TypeError("a batch is a dict or a non-empty list of micro-batch dicts")
    return mbs


def layout_problems(cfg, sizes: dict, *, pipeline: PipelineSpec | None = None, sequence_parallel: bool = False,
                    distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                    high_availability: bool = False, max_grad_norm: float | None = None,
                    policy: Policy | None = None) -> list[str]:
    """Why :func:`parallelize` would refuse these options on a mesh of these ``sizes`` (empty when
    it would not). Needs no process group, so a launcher can check its flags on every rank before
    any collective starts.

    Args:
      cfg: the :class:`~pmodel.model.ModelConfig`.
      sizes: ``{dim: size}`` of the mesh (``tp``, ``pp``, ``dp``; missing dims are 1).
      the rest: as :func:`parallelize`.
    """
    from .pipeline import split_layers
    from .tensor import tp_size_problems
    tp, pp, dp = (int(sizes.get(d, 1)) for d in ("tp", "pp", "dp"))
    out = []
    from .expert import ep_size_problems
    out += ep_size_problems(cfg, int(sizes.get("ep", 1)))
    if cfg.num_experts and sequence_parallel and cfg.moe_capacity_factor is not None:
        out.append("a mixture-of-experts model with a capacity factor and sequence_parallel: each rank would apply "
                   "the capacity to its sequence shard, not to the whole forward's tokens")
    if policy is not None and policy.param_dtype != cfg.dtype:
        out.append(f"the model computes in {cfg.dtype} but policy.param_dtype is {policy.param_dtype}; build the "
                   f"model with dtype={policy.param_dtype}")
    if sequence_parallel and tp == 1:
        out.append("sequence_parallel needs tp > 1 (it shards the sequence over the tensor-parallel group)")
    if tp > 1:
        out += tp_size_problems(cfg, tp)
    if high_availability and not distributed_optimizer:
        out.append("high_availability (replica optimizer) needs distributed_optimizer")
    elif high_availability and (dp < 2 or dp % 2):
        out.append(f"high_availability needs an even data-parallel size >= 2, got {dp}")
    if overlap_grad_reduce and dp == 1:
        out.append("overlap_grad_reduce needs data-parallel size > 1 (no gradient reduction to overlap)")
    if overlap_grad_reduce and pp > 1:
        out.append("overlap_grad_reduce with pipeline size > 1: the pipeline interleaves the micro-batches' "
                   "backwards, so a bucket's gradients are complete only after the schedule ends; the overlapped "
                   "reduction runs with pipeline size 1 only")
    if pipeline is not None and pp == 1:
        out.append("a PipelineSpec needs the mesh's pp size > 1")
    if pp > 1:
        spec = pipeline or PipelineSpec()
        try:
            split_layers(cfg.num_layers, pp, spec.layers_per_stage, spec.virtual_stages)
        except ValueError as e:
            out.append(str(e))
        if cfg.tie_embeddings and tp > 1:
            out.append("tied embeddings with tensor parallel and pipeline size > 1 are not supported yet (the "
                       "vocab-parallel embedding's gradient is not summed between the first and last stage)")
    if max_grad_norm is not None and not max_grad_norm > 0:
        out.append(f"max_grad_norm must be positive or None, got {max_grad_norm}")
    if policy is not None and policy.grad_accum_fp32 and overlap_grad_reduce:
        out.append("grad_accum_fp32 with overlap_grad_reduce: the fp32 accumulation hook and the overlapped bucket "
                   "launch are not ordered yet; drop one")
    return out


def parallelize(model, tx: GradientTransformation, mesh: Mesh, *, pipeline: PipelineSpec | None = None,
                sequence_parallel: bool = False, distributed_optimizer: bool = False,
                overlap_grad_reduce: bool = False, high_availability: bool = False,
                max_grad_norm: float | None = None, policy: Policy | None = None,
                bucket_numel: int = BUCKET_NUMEL, micro_batch_hook: Callable | None = None,
                deterministic: bool = False) -> ParallelPlan:
    """Compose tensor / sequence / pipeline / data parallelism, the optimizer layout and the
    precision policy into one train step (collective: every rank calls it).

    Args:
      model: the plain Model (LoRA, recompute and other model transforms already applied).
      tx: the inner optimizer (elementwise: adamw, sgd, masks, schedules). It must not clip by
        global norm: pass ``max_grad_norm``.
      mesh: the :class:`Mesh` (tp, pp and dp sizes come from it); ``Mesh.single()`` for one process.
      pipeline: a :class:`PipelineSpec` when ``mesh.size("pp") > 1`` (default: 1F1B, even split).
      sequence_parallel: shard activations on the sequence between TP regions (needs tp > 1).
      distributed_optimizer: ZeRO-1: fp32 main params and moments sharded over dp.
      overlap_grad_reduce: reduce each gradient bucket during backward.
      high_availability: the replica layout of the distributed optimizer (each shard held twice).
      max_grad_norm: global-norm clip (None = off).
      policy: precision (default from the model's dtype: fp32 main weights for bf16 / fp16
        params, dynamic loss scaling for fp16); its ``param_dtype`` must equal the model's dtype.
      bucket_numel: gradient bucket size in scalars.
      micro_batch_hook: ``(params, index or None) -> params`` per micro-batch (see ParallelPlan).
      deterministic: fixed-order data-parallel reductions (bitwise-reproducible runs with
        :func:`pmodel.device.set_deterministic`; see ParallelPlan).

    Returns:
      a :class:`ParallelPlan`.

    Raises:
      ValueError / NotImplementedError: with the reason, for any option that could not take effect.
    """
    cfg = model.config
    policy = policy or Policy(param_dtype=cfg.dtype)
    problems = layout_problems(cfg, mesh.sizes, pipeline=pipeline, sequence_parallel=sequence_parallel,
                               distributed_optimizer=distributed_optimizer, overlap_grad_reduce=overlap_grad_reduce,
                               high_availability=high_availability, max_grad_norm=max_grad_norm, policy=policy)
    if problems:
        raise ValueError("parallelize: " + "; ".join(problems))
    dp, pp = mesh.size("dp"), mesh.size("pp")
    if distributed_optimizer and dp == 1:
        warnings.warn("distributed_optimizer with data-parallel size 1: there is nothing to shard the optimizer "
                      "state over, so it saves no memory (it keeps an fp32 main copy of the params and applies "
                      "the same update as the plain optimizer)", UserWarning, stacklevel=2)
    if mesh.size("ep") > 1 and "expert_parallel" not in model.transforms:
        from .expert import expert_parallel
        model = expert_parallel(model, mesh)
    tp_model = tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
    pipe, stage_model = None, tp_model
    if pp > 1:
        spec = pipeline or PipelineSpec()
        pipe = _pipeline(tp_model, mesh, spec.schedule, microbatches=pp, layers_per_stage=spec.layers_per_stage,
                         virtual_stages=spec.virtual_stages)
        # The stage's view of the model: its declarations are exactly the stage params' leaves,
        # which the TP-aware norm weights and the replicated-gradient sync walk.
        stage_model = tp_model.replace(defs=pipe.stage_defs())
    zero = None
    if distributed_optimizer:
        zero = shard_spec(mesh, replica=high_availability, bucket_numel=bucket_numel)
        inner_tx = distributed_optimizer_tx(tx, zero)
    else:
        inner_tx = mixed_precision(tx, Policy(param_dtype=policy.param_dtype))
    ls = policy.loss_scale

    def init(params):
        inner = inner_tx.init(params)
        if optim.find_states(inner, optim.ClipState):
            raise ValueError("parallelize: the optimizer clips by global norm itself, which would see only this "
                             "rank's shards; pass max_grad_norm to parallelize instead")
        return PlanState(inner=inner, loss_scale=init_loss_scale(ls), count=torch.zeros((), dtype=torch.int64))

    def update(grads, state, params=None):
        raise TypeError("ParallelPlan.tx.update: use plan.step (the plan owns the gradient reduction, the "
                        "global norm and loss scaling)")

    plan = ParallelPlan(model=tp_model, stage_model=stage_model, pipe=pipe, mesh=mesh, policy=policy,
                        tx=GradientTransformation(init, update), inner_tx=inner_tx, zero=zero,
                        max_grad_norm=max_grad_norm,
                        overlap_grad_reduce=overlap_grad_reduce, bucket_numel=bucket_numel,
                        micro_batch_hook=micro_batch_hook, deterministic=deterministic)
    return plan


def single(model, tx: GradientTransformation, **kw) -> ParallelPlan:
    """The plan on one process (``Mesh.single()``): the single-process train step."""
    return parallelize(model, tx, Mesh.single(), **kw)
