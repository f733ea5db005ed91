"""Pipeline parallelism: stages cut from the Model record, explicit 1F1B / interleaved /
zero-bubble schedules over point-to-point sends.

``pipeline(model, mesh, schedule=..., microbatches=M)`` returns a :class:`Pipeline`. Each rank
along the mesh's ``pp`` dimension owns one *stage* (``virtual_stages`` chunks of it under the
interleaved schedule): the first virtual stage also owns ``embed`` (and ``pos_embed`` /
``embed_norm``), the last owns ``final_norm``, the output layer and the loss
(:attr:`Model.head_loss`). A stage runs its layers with :meth:`Model.run_layers`, so recompute,
LoRA and tensor-parallel wrappers work inside stages unchanged.

Stage parameters are the full model's tree restricted to the stage: ``params["layers"]`` is a
dict keyed by the *global* layer index as a string, so every leaf keeps the dotted path it has
in the full model (``layers.5.attn.q_proj.weight``). Keyed init therefore gives every stage
exactly the values the single-process model would have, and checkpoints name leaves globally.

The executor is our own (see docs/pipeline.md for why not ``torch.distributed.pipelining``): a
schedule is a per-rank list of ``(kind, microbatch, chunk)`` operations (``"F"`` forward,
``"B"`` backward, and for zero-bubble ``"B"`` = input gradient only and ``"W"`` = weight
gradient), executed in order with tagged non-blocking sends and blocking receives.

Mixture of experts: an MoE model's carry is ``(h, router statistics)``; a stage sends the
statistics (one flat fp32 vector) with the activation and receives their gradient with the
activation's, and the last stage adds the auxiliary losses from the totals (as ``Model.loss``),
so they and their gradients equal one process (docs/moe.md).

Loss scaling: each micro-batch's loss is its token-weighted sum divided by the *global* number
of counted tokens (of the whole batch, or ``num_tokens`` across data-parallel ranks), so the sum
over micro-batches is exactly the single-process mean and the gradients need no ``1/M``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from .. import ops, tree
from ..model import (Model, counted_mask, moe_loss_term, moe_stats_flatten, moe_stats_size, moe_stats_unflatten,
                     moe_stats_zeros)
from ..params import init as _init_params
from .mesh import Mesh

__all__ = ["pipeline", "Pipeline", "Op", "split_layers", "schedule_ops", "SCHEDULES"]

SCHEDULES = ("1f1b", "interleaved", "zero-bubble")
_FIRST_KEYS = ("embed", "pos_embed", "embed_norm")
_LAST_KEYS = ("final_norm", "lm_head")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Op(NamedTuple):
    """One scheduled operation: ``kind`` in ``F``/``B``/``W``, the micro-batch and the chunk."""

    kind: str
    microbatch: int
    chunk: int


# ============================================================================ layer split
def split_layers(num_layers: int, pp: int, layers_per_stage=None, virtual_stages: int = 1) -> tuple:
    """Layer ranges of every virtual stage, in pipeline order.

    Virtual stage ``v = chunk * pp + rank`` (Megatron's interleaved layout): rank ``r`` runs
    virtual stages ``r, r + pp, r + 2 pp, ...``.

    Args:
      num_layers: layers of the model.
      pp: pipeline-parallel size.
      layers_per_stage: None (even split) or per-rank layer counts (ModelLink's
        ``--num-layer-list``): length ``pp``, sum ``num_layers``, every entry >= 1 and, with
        virtual stages, divisible by ``virtual_stages``.
      virtual_stages: chunks per rank (interleaved schedule).

    Returns:
      tuple of ``(first_layer, num_layers)`` per virtual stage (length ``pp * virtual_stages``).
    """
    if pp < 1 or virtual_stages < 1:
        raise ValueError(f"pipeline: pp size {pp} and virtual_stages {virtual_stages} must be >= 1")
    V = virtual_stages
    if layers_per_stage is None:
        if num_layers % (pp * V):
            raise ValueError(f"pipeline: {num_layers} layers do not split evenly over pp={pp} x "
                             f"virtual_stages={V}; give layers_per_stage")
        per_rank = [num_layers // pp] * pp
    else:
        per_rank = [int(n) for n in layers_per_stage]
        if len(per_rank) != pp:
            raise ValueError(f"pipeline: layers_per_stage {list(layers_per_stage)} has {len(per_rank)} "
                             f"entries; expected one per pipeline stage (pp={pp})")
        if sum(per_rank) != num_layers:
            raise ValueError(f"pipeline: layers_per_stage {per_rank} sums to {sum(per_rank)}; the model "
                             f"has {num_layers} layers")
        if any(n < 1 for n in per_rank):
            raise ValueError(f"pipeline: layers_per_stage {per_rank} has a stage with no layers; "
                             f"every stage needs at least one")
    if any(n % V for n in per_rank):
        raise ValueError(f"pipeline: per-stage layer counts {per_rank} are not divisible by "
                         f"virtual_stages={V}")
    if any(n // V < 1 for n in per_rank):
        raise ValueError(f"pipeline: {per_rank} layers per stage leave an empty virtual stage (V={V})")
    out, first = [], 0
    for c in range(V):
        for r in range(pp):
            n = per_rank[r] // V
            out.append((first, n))
            first += n
    return tuple(out)


# ============================================================================ schedules
def schedule_ops(schedule: str, pp: int, rank: int, microbatches: int, virtual_stages: int = 1) -> list[Op]:
    """The ordered operations one rank executes in a training step.

    * ``1f1b`` (PipeDream-flush / Megatron): ``pp - rank - 1`` warm-up forwards, then one
      forward + one backward alternately, then the remaining backwards.
    * ``interleaved`` (Megatron's interleaved 1F1B): the same over ``M * V`` chunk-forwards in
      groups of ``pp`` micro-batches per chunk; warm-up ``2 (pp - rank - 1) + (V - 1) pp``.
    * ``zero-bubble`` (ZB-H1, Qi et al. 2023): 1F1B whose backward is split into ``B`` (input
      gradient, on the critical path) and ``W`` (weight gradient); rank ``r`` lets up to
      ``pp - r - 1`` W's lag behind and runs them in the cool-down, where 1F1B idles.
    """
    M, V, P = microbatches, virtual_stages, pp
    if schedule in ("1f1b", "zero-bubble"):
        warm = min(P - rank - 1, M)
        plain = [Op("F", i, 0) for i in range(warm)]
        for i in range(M - warm):
            plain += [Op("F", warm + i, 0), Op("B", i, 0)]
        plain += [Op("B", i, 0) for i in range(M - warm, M)]
        if schedule == "1f1b":
            return plain
        lag, pending, out = P - rank - 1, [], []
        steady_end = warm + 2 * (M - warm)  # index in `plain` where the cool-down starts
        for idx, op in enumerate(plain):
            out.append(op)
            if op.kind != "B":
                continue
            pending.append(Op("W", op.microbatch, 0))
            # In the steady state keep `lag` W's in flight; in the cool-down run one per B.
            if idx >= steady_end or len(pending) > lag:
                out.append(pending.pop(0))
        return out + pending
    if schedule != "interleaved":
        raise ValueError(f"pipeline: unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    total = M * V

    def chunk(k: int, forward: bool) -> int:
        c = (k % (P * V)) // P
        return c if forward else V - c - 1

    def mb(k: int) -> int:
        return (k // (P * V)) * P + k % P

    warm = total if M == P else min((P - rank - 1) * 2 + (V - 1) * P, total)
    ops_: list[Op] = [Op("F", mb(k), chunk(k, True)) for k in range(warm)]
    for k in range(total - warm):
        ops_ += [Op("F", mb(warm + k), chunk(warm + k, True)), Op("B", mb(k), chunk(k, False))]
    ops_ += [Op("B", mb(k), chunk(k, False)) for k in range(total - warm, total)]
    return ops_


# ============================================================================ zero-bubble backward split
def _reaches(roots, targets: set) -> set:
    """Autograd nodes reachable from ``roots`` from which some node in ``targets`` is reachable."""
    memo: dict = {}
    stack = [(n, False) for n in roots if n is not None]
    while stack:
        node, done = stack.pop()
        if node in memo and not done:
            continue
        kids = [e[0] for e in node.next_functions if e[0] is not None]
        if not done:
            memo[node] = None  # visiting
            stack.append((node, True))
            stack += [(k, False) for k in kids if k not in memo]
        else:
            memo[node] = node in targets or any(memo.get(k) for k in kids)
    return {n for n, v in memo.items() if v}


class _WeightGrad:
    """The deferred weight-gradient half of a zero-bubble backward.

    The input-gradient pass differentiates only towards the stage input; every autograd node on
    that path with an edge into the weight-only part of the graph (a *split* node, e.g. a matmul)
    gets a pre-hook that captures the gradient flowing into it. :meth:`run` later re-runs each
    split node for its weight-side edges only and back-propagates from there into the weights
    (accumulating ``.grad`` as ``backward`` would). The weight-only sub-graphs are disjoint from
    the input path, so nothing is counted twice.
    """

    def __init__(self, outs: list, grads: list, ins: list, weights: list):
        from torch.autograd.graph import get_gradient_edge
        in_nodes = {get_gradient_edge(x).node for x in ins}
        w_nodes = {get_gradient_edge(w).node: w for w in weights}
        roots = [o.grad_fn for o in outs]
        on_input = _reaches(roots, in_nodes)
        to_weights = _reaches(roots, set(w_nodes))
        self.splits = []  # (node, [(edge_node, input_nr)], captured grads)
        handles = []
        for node in on_input:
            edges = [(n, i) for n, i in node.next_functions
                     if n is not None and n not in on_input and n in to_weights]
            if edges:
                rec = [node, edges, None]
                self.splits.append(rec)
                handles.append(node.register_prehook(self._capture(rec)))
        self.weights = [w for n, w in w_nodes.items() if n in to_weights]
        self.in_grads = list(torch.autograd.grad(outs, ins, grads, retain_graph=True, allow_unused=True))
        for h in handles:
            h.remove()

    @staticmethod
    def _capture(rec):
        def hook(grad_outputs):
            rec[2] = tuple(g.detach() if g is not None else None for g in grad_outputs)
        return hook

    def run(self) -> None:
        from torch.autograd.graph import GradientEdge
        roots, grads = [], []
        for node, edges, captured in self.splits:
            if captured is None:
                continue
            outs = [GradientEdge(node, i) for i, g in enumerate(captured) if g is not None]
            gouts = [g for g in captured if g is not None]
            targets = [GradientEdge(n, i) for n, i in edges]
            # Re-run only this split node, towards its weight-side edges.
            got = torch.autograd.grad(outs, targets, gouts, retain_graph=True, allow_unused=True)
            for t, g in zip(targets, got):
                if g is not None:
                    roots.append(t)
                    grads.append(g)
        if roots:
            torch.autograd.backward(roots, grads, inputs=self.weights)
        self.splits = []


def _moe_metric_sums(aux: dict) -> torch.Tensor:
    """``[lb * w, z * w, dropped, pairs]`` of one micro-batch's ``moe_*`` metrics (``w`` its token
    share of the global batch): summed over micro-batches and data-parallel ranks they give the
    token-weighted means and the totals the train step reports."""
    w = aux["moe_weight"].double()
    return torch.stack([aux["moe_aux_loss"].double() * w, aux["moe_z_loss"].double() * w,
                        aux["moe_dropped"].double().sum(), aux["moe_pairs"].double().sum()])


def _device_of(params) -> torch.device:
    for x in tree.leaves(params):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


# ============================================================================ the pipeline
@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Pipeline:
    """A model split into pipeline stages, plus the schedule that runs them.

    Build with :func:`pipeline`. Attributes:
      model: the (possibly transformed) full :class:`Model`.
      mesh: the :class:`Mesh`; its ``pp`` dimension holds the stages.
      schedule: ``"1f1b"``, ``"interleaved"`` or ``"zero-bubble"``.
      microbatches: micro-batches per step.
      virtual_stages: chunks per rank.
      stages: ``(first_layer, num_layers)`` per virtual stage, pipeline order.
    """

    model: Model
    mesh: Mesh
    schedule: str
    microbatches: int
    virtual_stages: int
    stages: tuple

    # ------------------------------------------------------------------ layout
    @property
    def pp(self) -> int:
        return self.mesh.size("pp")

    @property
    def rank(self) -> int:
        return self.mesh.rank("pp")

    def chunk_stage(self, chunk: int) -> int:
        """Virtual stage index of this rank's ``chunk``."""
        return chunk * self.pp + self.rank

    def chunk_layers(self, chunk: int) -> range:
        first, n = self.stages[self.chunk_stage(chunk)]
        return range(first, first + n)

    @property
    def layers(self) -> list[int]:
        """Global indices of this rank's layers, in order."""
        return [i for c in range(self.virtual_stages) for i in self.chunk_layers(c)]

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.pp - 1

    def _peer(self, pp_rank: int) -> int:
        return self.mesh.ranks("pp")[pp_rank]

    # ------------------------------------------------------------------ params
    def stage_defs(self) -> dict:
        """The declarations this rank holds (same paths as the full model)."""
        defs = self.model.defs
        out: dict = {}
        if self.is_first:
            out.update({k: defs[k] for k in _FIRST_KEYS if k in defs})
        out["layers"] = {str(i): defs["layers"][i] for i in self.layers}
        if self.is_last:
            out.update({k: defs[k] for k in _LAST_KEYS if k in defs})
            if self.model.config.tie_embeddings and not self.is_first:
                # The output layer reuses the embedding: the last stage keeps its own copy (same
                # keyed init) whose gradient is summed with the first stage's after backward.
                out["embed"] = defs["embed"]
        return out

    def init(self, seed: int = 0, *, dtype: torch.dtype | None = None, device: Any = None) -> dict:
        """Materialise only this stage's parameters (values equal to ``pmodel.init(model, seed)``).

        Args:
          seed: the run seed (leaves keyed by their global path).
          dtype, device: as :func:`pmodel.init`.

        Returns:
          the stage params tree.
        """
        return _init_params(self.model.replace(defs=self.stage_defs()), seed, dtype=dtype, device=device)

    def stage_params(self, full_params: dict) -> dict:
        """Select this rank's part of a full (single-process layout) params tree (no copies).

        The keys come in :meth:`stage_defs` order, so the leaves line up one to one with the stage's
        declarations (what layout-weighted norms and checkpoint specs walk)."""
        return {k: ({str(i): full_params["layers"][i] for i in self.layers} if k == "layers" else full_params[k])
                for k in self.stage_defs()}

    # ------------------------------------------------------------------ communication
    def _tag(self, kind: int, microbatch: int, chunk: int) -> int:
        # Independent of the step's micro-batch count, so any number of micro-batches can run.
        # kinds: 0 header, 1 activation, 2 its gradient, 3 tied embedding, 4 MoE router statistics,
        # 5 their gradient
        return (microbatch * 6 + kind) * self.virtual_stages + chunk

    @property
    def _moe(self) -> bool:
        return bool(self.model.config.num_experts)

    def _send_carry(self, outs: list, microbatch: int, chunk: int, sends: list) -> None:
        """Send a chunk's outputs: the activation and, for an MoE model, the router statistics
        summed over the layers so far (one flat fp32 vector of fixed size)."""
        self._send_act(outs[0], microbatch, chunk, sends)
        if len(outs) > 1:
            v = self.chunk_stage(chunk) + 1
            dst, dst_chunk = self._peer(v % self.pp), v // self.pp
            data = outs[1].detach().contiguous()
            sends.append((dist.isend(data, dst, tag=self._tag(4, microbatch, dst_chunk)), data))

    def _recv_carry(self, microbatch: int, chunk: int, device) -> list:
        ins = [self._recv_act(microbatch, chunk, device)]
        if self._moe:
            v = self.chunk_stage(chunk) - 1
            s = torch.empty(moe_stats_size(self.model.config), dtype=torch.float32, device=device)
            dist.recv(s, self._peer(v % self.pp), tag=self._tag(4, microbatch, chunk))
            ins.append(s)
        return ins

    def _send_grads(self, grads: list, ins: list, microbatch: int, chunk: int, sends: list) -> None:
        """Send the gradients of a chunk's inputs upstream (zeros for an input that got none)."""
        v = self.chunk_stage(chunk) - 1
        dst, dst_chunk = self._peer(v % self.pp), v // self.pp
        for kind, g, x in zip((2, 5), grads, ins):
            data = (g if g is not None else torch.zeros_like(x)).detach().contiguous()
            sends.append((dist.isend(data, dst, tag=self._tag(kind, microbatch, dst_chunk)), data))

    def _recv_grads(self, outs: list, microbatch: int, chunk: int) -> list:
        v = self.chunk_stage(chunk) + 1
        out = []
        for kind, like in zip((2, 5), outs):
            g = torch.empty_like(like)
            dist.recv(g, self._peer(v % self.pp), tag=self._tag(kind, microbatch, chunk))
            out.append(g)
        return out

    def _start_carry(self, h: torch.Tensor):
        return (h, moe_stats_zeros(self.model.config, h.device)) if self._moe else h

    def _carry_from(self, ins: list):
        return (ins[0], moe_stats_unflatten(self.model.config, ins[1])) if self._moe else ins[0]

    def _outs_of(self, carry) -> list:
        return [carry[0], moe_stats_flatten(carry[1])] if self._moe else [carry]

    def _send_act(self, h: torch.Tensor, microbatch: int, chunk: int, sends: list) -> None:
        """Send a chunk's output to the next virtual stage (header with shape/dtype first)."""
        v = self.chunk_stage(chunk) + 1
        dst, dst_chunk = self._peer(v % self.pp), v // self.pp
        if h.dtype not in _DTYPES or h.dim() > 6:
            raise ValueError(f"pipeline: cannot send activation of dtype {h.dtype} / {h.dim()} dims")
        header = torch.tensor([_DTYPES.index(h.dtype), h.dim(), *h.shape] + [0] * (6 - h.dim()), dtype=torch.int64,
                              device=h.device)
        data = h.detach().contiguous()
        sends.append((dist.isend(header, dst, tag=self._tag(0, microbatch, dst_chunk)), header))
        sends.append((dist.isend(data, dst, tag=self._tag(1, microbatch, dst_chunk)), data))

    def _recv_act(self, microbatch: int, chunk: int, device) -> torch.Tensor:
        v = self.chunk_stage(chunk) - 1
        src = self._peer(v % self.pp)
        header = torch.empty(8, dtype=torch.int64, device=device)
        dist.recv(header, src, tag=self._tag(0, microbatch, chunk))
        dt, nd = _DTYPES[int(header[0])], int(header[1])
        h = torch.empty([int(s) for s in header[2:2 + nd]], dtype=dt, device=device)
        dist.recv(h, src, tag=self._tag(1, microbatch, chunk))
        return h

    # ------------------------------------------------------------------ batches
    def _microbatches(self, batch) -> list[dict]:
        """A list of micro-batch dicts as given, or a dict cut into ``microbatches`` pieces."""
        if not isinstance(batch, dict):
            mbs = list(batch)
            if not mbs or not all(isinstance(b, dict) for b in mbs):
                raise TypeError("pipeline: a batch is a dict or a non-empty list of micro-batch dicts")
            return mbs
        B, T = batch["tokens"].shape
        M = self.microbatches
        if B % M:
            raise ValueError(f"pipeline: batch size {B} is not divisible by microbatches={M}")
        b = B // M
        out = []
        for j in range(M):
            mbatch = {}
            for k, v in batch.items():
                if v is None:
                    continue
                if k == "cu_seqlens":
                    lo, hi = j * b * T, (j + 1) * b * T
                    # Re-base packed boundaries onto this micro-batch's flattened tokens; clamping
                    # keeps which positions share a document.
                    mbatch[k] = torch.unique(v.clamp(lo, hi) - lo)
                elif isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == B:
                    mbatch[k] = v[j * b:(j + 1) * b]
                else:
                    raise ValueError(f"pipeline: batch key {k!r} (shape {getattr(v, 'shape', None)}) cannot "
                                     f"be split into micro-batches along the batch dimension {B}")
            out.append(mbatch)
        return out

    @staticmethod
    def _labels_weights(mb: dict, denom):
        mask = counted_mask(mb)
        return mb["labels"].masked_fill(~mask, ops.IGNORE_INDEX), mask.float() / denom, mask.sum()

    def _context(self, mb: dict):
        # Through the model, so its kernel policy (Model.kernels) reaches every stage.
        return self.model.context(mb["tokens"], position_ids=mb.get("position_ids"),
                                  attention_mask=mb.get("attention_mask"), cu_seqlens=mb.get("cu_seqlens"))

    # ------------------------------------------------------------------ the step
    def forward_backward(self, params: dict, batch, *, num_tokens=None, loss_scale: float = 1.0, bind=None,
                         record: list | None = None):
        """Run one step's forwards and backwards; gradients accumulate into ``.grad``.

        Every pipeline rank passes the same micro-batches (the first stage reads tokens, the last
        labels; every stage builds positions / masks from them).

        Args:
          params: this stage's params (:meth:`init` / :meth:`stage_params`).
          batch: a list of micro-batch dicts, or one dict whose batch dimension is cut into
            ``microbatches`` pieces: ``tokens``, ``labels`` (shifted), optional ``loss_mask``,
            ``position_ids``, ``attention_mask``, ``cu_seqlens``.
          num_tokens: loss denominator; default the micro-batches' counted tokens. Pass the
            global count under data parallelism.
          loss_scale: multiplies every micro-batch's loss before backward (fp16 loss scaling).
          bind: optional ``j -> params`` giving the params to run micro-batch ``j`` with (e.g. LoRA
            dropout keys bound per micro-batch); default ``params``.
          record: if a list, the executed :class:`Op` s are appended to it.

        Returns:
          ``(loss, aux)`` on every pipeline rank (broadcast from the last stage):
          ``aux = {"num_tokens", "loss_sum"}``; ``loss`` is the mean over ``num_tokens``
          (detached, unscaled; for an MoE model it includes the auxiliary losses, as
          ``Model.loss``'s does) and ``loss_sum`` the sum of the per-token losses.
        """
        mbs = self._microbatches(batch)
        M = len(mbs)
        if self.schedule == "interleaved" and M % self.pp:
            raise ValueError(f"pipeline: interleaved 1F1B needs the micro-batch count ({M}) to be a multiple of "
                             f"the pipeline size ({self.pp})")
        dev = _device_of(params)
        n_all = sum(counted_mask(mb).sum() for mb in mbs)
        denom = num_tokens if num_tokens is not None else n_all.clamp(min=1)
        sends: list = []
        saved: dict = {}  # (microbatch, chunk) -> (h_in or None, out)
        deferred: dict = {}
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        per_tok_sum = torch.zeros((), dtype=torch.float32, device=dev)
        moe = torch.zeros(4, dtype=torch.float32, device=dev)  # token-weighted lb, z; dropped, pairs
        weights = [x for x in tree.leaves(params) if isinstance(x, torch.Tensor) and x.requires_grad]
        zb = self.schedule == "zero-bubble"
        for op in schedule_ops(self.schedule, self.pp, self.rank, M, self.virtual_stages):
            j, c = op.microbatch, op.chunk
            v = self.chunk_stage(c)
            first_v, last_v = v == 0, v == self.pp * self.virtual_stages - 1
            if op.kind == "F":
                mb = mbs[j]
                p = bind(j) if bind is not None else params
                ctx = self._context(mb)
                if first_v:
                    ins = []
                    carry = self._start_carry(self.model.embed(p, mb["tokens"], ctx))
                else:
                    ins = [x.requires_grad_(True) for x in self._recv_carry(j, c, dev)]
                    carry = self._carry_from(ins)
                idx = self.chunk_layers(c)
                carry = self.model.run_layers([p["layers"][str(i)] for i in idx], carry, ctx, idx.start)
                if last_v:
                    h = carry[0] if self._moe else carry
                    labels, w, n = self._labels_weights(mb, denom)
                    out, per_tok = self.model.head_loss(p, h, labels, w, ctx)
                    if self._moe:
                        # The micro-batch's auxiliary losses from the statistics of every stage's
                        # layers (received with the activations), as Model.loss adds them.
                        extra, maux = moe_loss_term(self.model.config, carry[1], n, denom)
                        moe = moe + _moe_metric_sums(maux).to(moe)
                        if extra is not None:
                            out = out + extra.to(out.dtype)
                    loss_sum = loss_sum + out.detach().float()
                    per_tok_sum = per_tok_sum + per_tok.detach().float().sum()
                    if loss_scale != 1.0:
                        out = out * loss_scale
                    outs = [out]
                else:
                    outs = self._outs_of(carry)
                    self._send_carry(outs, j, c, sends)
                saved[(j, c)] = (ins, outs)
            elif op.kind == "B":
                ins, outs = saved.pop((j, c))
                grads = [None] if last_v else self._recv_grads(outs, j, c)
                # Outputs that do not depend on anything trainable (e.g. statistics under a frozen
                # router) get no backward.
                pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
                outs, grads = [o for o, _ in pairs], [g for _, g in pairs]
                if zb and ins and outs:
                    wg = _WeightGrad(outs, grads, ins, weights)
                    deferred[(j, c)] = wg
                    in_grads = wg.in_grads
                else:
                    if zb:
                        deferred[(j, c)] = None  # first stage: nothing to split off
                    if outs:
                        torch.autograd.backward(outs, grads)
                    in_grads = [x.grad for x in ins]
                if not first_v:
                    self._send_grads(in_grads, ins, j, c, sends)
                del outs, ins
            else:  # "W"
                wg = deferred.pop((j, c))
                if wg is not None:
                    wg.run()
            if record is not None:
                record.append(op)
        if saved or deferred:
            raise RuntimeError(f"pipeline: schedule left work undone: {sorted(saved)} {sorted(deferred)}")
        for work, _ in sends:
            work.wait()
        self._sync_tied_embedding(params)
        return self._broadcast_loss(loss_sum, per_tok_sum, n_all, moe)

    @torch.no_grad()
    def forward_only(self, params: dict, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation: every micro-batch through every stage, no backward.

        Returns:
          ``(loss_sum, num_tokens)`` of the micro-batches on every pipeline rank (broadcast from
          the last stage): the sum of per-token losses and the counted tokens.
        """
        mbs = self._microbatches(batch)
        dev = _device_of(params)
        sends: list = []
        loss_sum = torch.zeros((), dtype=torch.float32, device=dev)
        last = self.pp * self.virtual_stages - 1
        for j, mb in enumerate(mbs):
            ctx = self._context(mb)
            for c in range(self.virtual_stages):
                v = self.chunk_stage(c)
                if v == 0:
                    carry = self._start_carry(self.model.embed(params, mb["tokens"], ctx))
                else:
                    carry = self._carry_from(self._recv_carry(j, c, dev))
                idx = self.chunk_layers(c)
                carry = self.model.run_layers([params["layers"][str(i)] for i in idx], carry, ctx, idx.start)
                if v == last:
                    h = carry[0] if self._moe else carry
                    labels, w, _ = self._labels_weights(mb, 1)
                    _, per_tok = self.model.head_loss(params, h, labels, w, ctx)
                    loss_sum = loss_sum + per_tok.float().sum()
                else:
                    self._send_carry(self._outs_of(carry), j, c, sends)
        for work, _ in sends:
            work.wait()
        n_all = sum(counted_mask(mb).sum() for mb in mbs)
        _, aux = self._broadcast_loss(torch.zeros_like(loss_sum), loss_sum, n_all)
        return aux["loss_sum"], aux["num_tokens"]

    def _sync_tied_embedding(self, params) -> None:
        """Sum the tied embedding's gradient over the first and last stage (both hold a copy)."""
        if not (self.model.config.tie_embeddings and self.pp > 1 and (self.is_first or self.is_last)):
            return
        w = params["embed"]["weight"]
        if not isinstance(w, torch.Tensor):
            raise NotImplementedError("pipeline: tied embeddings with wrapped (parallel / LoRA) embedding weights")
        if not w.requires_grad:
            return
        g = w.grad if w.grad is not None else torch.zeros_like(w)
        other = self._peer(self.pp - 1 if self.is_first else 0)
        buf = torch.empty_like(g)
        # Both sides send first (non-blocking) then receive: no ordering deadlock.
        work = dist.isend(g.detach().contiguous(), other, tag=self._tag(3, 0, 0))
        dist.recv(buf, other, tag=self._tag(3, 0, 0))
        work.wait()
        if w.grad is None:
            w.grad = buf
        else:
            w.grad.add_(buf)

    def _broadcast_loss(self, loss_sum, per_tok_sum, n_all, moe=None):
        vals = torch.cat([torch.stack([loss_sum, per_tok_sum]), moe if moe is not None else loss_sum.new_zeros(0)])
        if self.pp > 1:
            dist.broadcast(vals, self._peer(self.pp - 1), group=self.mesh.group("pp"))
        aux = {"num_tokens": n_all.detach(), "loss_sum": vals[1]}
        if moe is not None and self._moe:
            aux["moe"] = vals[2:]  # see _moe_metric_sums
        return vals[0], aux


def pipeline(model: Model, mesh: Mesh, schedule: str = "1f1b", microbatches: int = 1,
             layers_per_stage=None, virtual_stages: int = 1) -> Pipeline:
    """Split ``model`` into pipeline stages over the mesh's ``pp`` dimension.

    Args:
      model: a :class:`Model` (plain, recompute, LoRA, tensor parallel, ...).
      mesh: the :class:`Mesh`; stages live along ``pp`` (TP / DP coordinates pair up stage peers).
      schedule: ``"1f1b"``, ``"interleaved"`` (needs ``virtual_stages >= 2`` and ``microbatches``
        a multiple of pp) or ``"zero-bubble"`` (ZB-H1).
      microbatches: micro-batches per step (the batch dimension must divide by it).
      layers_per_stage: per-stage layer counts (uneven split) or None for an even split.
      virtual_stages: model chunks per rank (interleaved schedule only).

    Returns:
      a :class:`Pipeline`.

    Raises:
      ValueError: an invalid split, schedule / virtual-stage mismatch, or micro-batch count.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline: unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    if not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"pipeline: microbatches must be a positive int, got {microbatches!r}")
    pp = mesh.size("pp")
    if schedule == "interleaved":
        if virtual_stages < 2:
            raise ValueError("pipeline: the interleaved schedule needs virtual_stages >= 2; use '1f1b' for one "
                             "chunk per rank")
        if microbatches % pp:
            raise ValueError(f"pipeline: interleaved 1F1B needs microbatches ({microbatches}) to be a "
                             f"multiple of the pipeline size ({pp})")
    elif virtual_stages != 1:
        raise ValueError(f"pipeline: virtual_stages={virtual_stages} needs schedule='interleaved' "
                         f"(got {schedule!r})")
    if model.config.tie_embeddings and pp > 1 and "tensor_parallel" in model.transforms and mesh.size("tp") > 1:
        raise NotImplementedError("pipeline: tied embeddings with a sharding transform (tensor parallel) "
                                  "and pp > 1 is not supported yet")
    stages = split_layers(model.config.num_layers, pp, layers_per_stage, virtual_stages)
    return Pipeline(model=model, mesh=mesh, schedule=schedule, microbatches=microbatches,
                    virtual_stages=virtual_stages, stages=stages)
