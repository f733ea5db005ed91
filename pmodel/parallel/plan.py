"""``parallelize``: the one function scripts call to turn parallel flags into transforms.

Every option takes effect or raises with the reason (no silent no-ops):

* ``sequence_parallel`` needs ``tp > 1``;
* ``distributed_optimizer`` with ``dp == 1`` warns (``UserWarning``) that nothing is sharded: it
  still runs (an fp32 main copy of the params and the same update as the plain optimizer, as
  Megatron's ``--use-distributed-optimizer`` does on one dp rank), so a TP-only launch with the
  flag works, but the warning says it saves no memory there;
* ``high_availability`` (replica optimizer) needs ``distributed_optimizer`` and an even ``dp >= 2``;
* ``overlap_grad_reduce`` needs ``dp > 1`` (there is no reduction to overlap otherwise);
* TP must divide heads / MLP width / padded vocab (checked by :func:`tensor_parallel`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

import torch

from .. import tree
from ..optim import GradientTransformation, apply_updates
from . import comm
from .data import DataParallel
from .mesh import Mesh
from .optimizer import distributed_optimizer as _dist_opt
from .optimizer import grad_norm
from .tensor import sync_replicated_grads, tensor_parallel

__all__ = ["ParallelPlan", "parallelize", "pipeline_train_step", "pipeline_grad_norm"]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class ParallelPlan:
    """A parallelised model + optimizer and the train step that drives them.

    Attributes:
      model: the tensor-parallel Model.
      tx: the optimizer (the distributed one when asked).
      mesh: the :class:`Mesh`.
      overlap_grad_reduce, bucket_numel: data-parallel reduction settings.
      reduce: ``"reduce_scatter"`` for the distributed optimizer, else ``"all_reduce"``.
      max_grad_norm: global-norm clip (None = off), applied with the TP / dp aware norm.
      distributed: whether ``tx`` is the sharded optimizer (it clips itself).
    """

    model: Any
    tx: GradientTransformation
    mesh: Mesh
    overlap_grad_reduce: bool
    bucket_numel: int
    reduce: str
    max_grad_norm: float | None
    distributed: bool

    def data_parallel(self, params) -> DataParallel:
        """The gradient buckets for ``params`` (create once, before the first backward)."""
        return DataParallel(params, self.mesh, bucket_numel=self.bucket_numel, overlap=self.overlap_grad_reduce,
                            reduce=self.reduce)

    def step(self, params, opt_state, dp: DataParallel, micro_batches: list[dict]):
        """One optimizer step over this rank's micro-batches (gradient accumulation).

        The loss is the mean over every counted token of the global batch (all micro-batches of
        all dp ranks), so the result equals the single-process step on the concatenated batch.

        Returns:
          ``(opt_state, {"loss": global mean loss, "grad_norm": ..., "num_tokens": ...})``.
        """
        if not micro_batches:
            raise ValueError("ParallelPlan.step: no micro-batches")
        counts = [((b["labels"] != -100) & (b["loss_mask"] > 0 if b.get("loss_mask") is not None
                                             else torch.ones_like(b["labels"], dtype=torch.bool))).sum()
                  for b in micro_batches]
        total = comm.all_reduce(torch.stack(counts).sum(), self.mesh.group("dp")).clamp(min=1)
        loss_sum = torch.zeros(())
        for i, b in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            ctx = dp.no_sync() if not last else contextlib.nullcontext()
            with ctx:
                loss, _ = self.model.loss(params, b, num_tokens=total)
                loss.backward()
            loss_sum = loss_sum + loss.detach().float()
        dp.finish()
        sync_replicated_grads(self.model, params)  # SP norms, LoRA's replicated factors
        grads = tree.map(lambda p: p.grad if p.requires_grad else None, params)
        norm = None
        if not self.distributed:
            norm = grad_norm(self.model, params, self.mesh)
            if self.max_grad_norm is not None:
                coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
                # Clip in fp32 (a no-op cast for fp32 grads): bf16 grads times coef would round the
                # clipped gradient to bf16 before the fp32 main-weight optimizer sees it.
                grads = tree.map(lambda g: None if g is None else g.float() * coef, grads,
                                 is_leaf=lambda x: x is None)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        apply_updates(params, updates)
        dp.zero_grad()
        if self.distributed:
            norm = opt_state.grad_norm
        loss = comm.all_reduce(loss_sum, self.mesh.group("dp"))
        return opt_state, {"loss": loss, "grad_norm": norm, "num_tokens": total}


def parallelize(model, tx: GradientTransformation, mesh: Mesh, *, sequence_parallel: bool = False,
                distributed_optimizer: bool = False, overlap_grad_reduce: bool = False,
                high_availability: bool = False, bucket_numel: int = 40_000_000,
                max_grad_norm: float | None = None) -> ParallelPlan:
    """Apply tensor / sequence / data parallelism and the (distributed) optimizer from flags.

    Args:
      model: the plain Model.
      tx: the optimizer; must not contain its own global-norm clip (pass ``max_grad_norm``: a clip
        inside ``tx`` would see only local shards under TP or the distributed optimizer).
      mesh: the :class:`Mesh` (tp and dp sizes come from it).
      sequence_parallel: ``--sequence-parallel``.
      distributed_optimizer: ``--use-distributed-optimizer`` (ZeRO-1 over dp).
      overlap_grad_reduce: ``--overlap-grad-reduce``.
      high_availability: ``--enable-high-availability`` (replica optimizer layout).
      bucket_numel: gradient bucket size in scalars.
      max_grad_norm: ``--clip-grad`` (None = off).

    Returns:
      a :class:`ParallelPlan`.
    """
    dp = mesh.size("dp")
    if distributed_optimizer and dp == 1:
        warnings.warn("--use-distributed-optimizer with data-parallel size 1: there is nothing to shard the "
                      "optimizer state over, so it saves no memory (it keeps an fp32 main copy of the params "
                      "and applies the same update as the plain optimizer)", UserWarning, stacklevel=2)
    if high_availability and not distributed_optimizer:
        raise ValueError("--enable-high-availability (replica optimizer) needs --use-distributed-optimizer")
    if high_availability and (dp < 2 or dp % 2):
        raise ValueError(f"--enable-high-availability needs an even data-parallel size >= 2, got {dp}")
    if overlap_grad_reduce and dp == 1:
        raise ValueError("--overlap-grad-reduce needs data-parallel size > 1 (no gradient reduction to overlap)")
    tp_model = tensor_parallel(model, mesh, sequence_parallel=sequence_parallel)
    if distributed_optimizer:
        tx = _dist_opt(tx, mesh, model=tp_model, replica=high_availability, bucket_numel=bucket_numel,
                       max_grad_norm=max_grad_norm)
    reduce = "reduce_scatter" if distributed_optimizer and not high_availability else "all_reduce"
    return ParallelPlan(model=tp_model, tx=tx, mesh=mesh, overlap_grad_reduce=overlap_grad_reduce,
                        bucket_numel=bucket_numel, reduce=reduce, max_grad_norm=max_grad_norm,
                        distributed=distributed_optimizer)


def pipeline_grad_norm(stage_model, params, mesh: Mesh, *, skip_path: str | None = None) -> torch.Tensor:
    """Global gradient norm of a pipeline stage's params: TP-weighted per leaf, summed over tp and pp.

    Args:
      stage_model: the stage's view of the (tensor-parallel) model: its declarations are exactly
        the stage params' leaves (``tp_model.replace(defs=pipe.stage_defs())``).
      params: the stage's params, gradients in ``.grad``.
      mesh: the mesh (groups ``tp`` and ``pp``).
      skip_path: a leaf left out, e.g. the last stage's copy of a tied embedding, so the tied
        weight counts once as in the single-process norm.
    """
    from .optimizer import norm_weights
    sq = torch.zeros((), dtype=torch.float64)
    for (path, p), w in zip(tree.paths(params), norm_weights(stage_model, params)):
        if p.grad is not None and path != skip_path:
            sq = sq + w * p.grad.detach().double().pow(2).sum()
    sq = comm.all_reduce(comm.all_reduce(sq, mesh.group("tp")), mesh.group("pp"))
    return sq.sqrt().float()


def pipeline_train_step(pipe, stage_model, tx: GradientTransformation, mesh: Mesh, dp: DataParallel, *,
                        max_grad_norm: float | None = None, distributed_optimizer: bool = False,
                        skip_norm_path: str | None = None):
    """The train step of a pipeline-parallel run (composed with TP / SP and DP).

    Args:
      pipe: a :class:`~pmodel.parallel.pipeline.Pipeline`.
      stage_model: the stage's view of the model (see :func:`pipeline_grad_norm`).
      tx: the optimizer: plain (possibly mixed precision) or a distributed optimizer, which
        clips with its own ``max_grad_norm`` and reports ``state.grad_norm``.
      mesh: the mesh.
      dp: the stage's data-parallel gradient buckets.
      max_grad_norm: clip for a plain optimizer (done here, on the global TP/PP norm).
      distributed_optimizer: whether ``tx`` is a distributed optimizer.
      skip_norm_path: see :func:`pipeline_grad_norm`.

    Returns:
      ``step(params, opt_state, micro_batches) -> (opt_state, metrics)`` where
      ``micro_batches`` are this dp rank's micro-batches of one global batch and ``metrics`` has
      the global mean ``loss`` (summed over dp) and ``grad_norm``. Params change in place.
    """
    def step(params, opt_state, micro_batches: list[dict]):
        # This rank's micro-batches as one batch; the pipeline cuts it back into its micro-batches.
        local = {key: torch.cat([m[key] for m in micro_batches]) for key in micro_batches[0]}
        cnt = (local["labels"] != -100)
        if local.get("loss_mask") is not None:
            cnt = cnt & (local["loss_mask"] > 0)
        total = comm.all_reduce(cnt.sum(), mesh.group("dp")).clamp(min=1)  # the global loss denominator
        loss, _ = pipe.forward_backward(params, local, num_tokens=total)
        dp.finish()
        sync_replicated_grads(stage_model, params)  # SP norms / LoRA factors over TP
        grads = tree.map(lambda p: p.grad if p.requires_grad else None, params)
        norm = None
        if not distributed_optimizer:
            norm = pipeline_grad_norm(stage_model, params, mesh, skip_path=skip_norm_path)
            if max_grad_norm is not None:
                coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
                # in fp32: a mixed-precision optimizer then sees the unrounded clipped gradient
                grads = tree.map(lambda g: None if g is None else g.float() * coef, grads,
                                 is_leaf=lambda x: x is None)
        updates, opt_state = tx.update(grads, opt_state, params)
        apply_updates(params, updates)
        dp.zero_grad()
        if distributed_optimizer:
            norm = opt_state.grad_norm
        return opt_state, {"loss": comm.all_reduce(loss, mesh.group("dp")), "grad_norm": norm}

    return step
