"""Data parallelism: gradients in flat buckets, reduced over the ``dp`` group once per step.

:class:`DataParallel` makes every trainable parameter's ``.grad`` a view into a flat bucket
buffer (Megatron's contiguous gradient buffer). Autograd accumulates into those views in place,
so gradient accumulation over micro-batches just keeps adding, and each bucket is reduced with
one collective when the step's last backward has produced all its gradients:

* ``overlap=False``: :meth:`DataParallel.finish` reduces every bucket after backward.
* ``overlap=True``: a ``register_post_accumulate_grad_hook`` on each parameter counts the bucket's
  ready gradients and starts the bucket's asynchronous collective as soon as the last one lands,
  while backward continues with earlier layers; :meth:`finish` only waits.

Inside :meth:`DataParallel.no_sync` (all micro-batches but the last) nothing is reduced, so the
reduction happens once per step. Buckets follow reverse parameter order (the order backward
produces gradients) and are padded to a multiple of the shard count so the distributed optimizer
can reduce-scatter them.

Gradients are **summed** over dp, not averaged: :meth:`pmodel.model.Model.loss` takes the
token count of the whole global batch as ``num_tokens``, so the summed gradient is exactly the single-process
gradient of the global mean loss, whatever the per-rank token counts.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist

from .. import tree
from . import comm
from .mesh import Mesh

__all__ = ["BucketLayout", "DataParallel", "bucket_layout"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class BucketLayout:
    """Where each trainable leaf lives in the flat buckets.

    Attributes:
      index: per leaf in tree order, ``(bucket, offset, numel)`` or None for frozen leaves.
      sizes: padded numel of each bucket (a multiple of ``pad``).
      members: per bucket, the tree-order indices of its leaves.
      pad: the shard count the buckets are padded for.
    """

    index: tuple
    sizes: tuple
    members: tuple
    pad: int

    def shard_range(self, bucket: int, shard: int) -> tuple[int, int]:
        n = self.sizes[bucket] // self.pad
        return shard * n, (shard + 1) * n


def _trainable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad


def bucket_layout(params, *, bucket_numel: int, pad: int = 1) -> BucketLayout:
    """Group the trainable leaves of ``params`` into buckets of about ``bucket_numel`` scalars.

    Leaves are taken in reverse tree order (output layer first: the order backward produces
    gradients); a leaf is never split across buckets.
    """
    if bucket_numel < 1 or pad < 1:
        raise ValueError(f"bucket_layout: bucket_numel and pad must be >= 1, got {bucket_numel}, {pad}")
    leaves = tree.leaves(params)
    index: list = [None] * len(leaves)
    sizes, members, cur, cur_members = [], [], 0, []
    for i in reversed(range(len(leaves))):
        t = leaves[i]
        if not _trainable(t):
            continue
        index[i] = (len(sizes), cur, t.numel())
        cur += t.numel()
        cur_members.append(i)
        if cur >= bucket_numel:
            sizes.append(-(-cur // pad) * pad)
            members.append(tuple(cur_members))
            cur, cur_members = 0, []
    if cur_members:
        sizes.append(-(-cur // pad) * pad)
        members.append(tuple(cur_members))
    return BucketLayout(index=tuple(index), sizes=tuple(sizes), members=tuple(members), pad=pad)


class DataParallel:
    """Bucketed gradient reduction over the mesh's ``dp`` group.

    Args:
      params: the (local) params tree; trainable leaves get ``.grad`` views into the buckets.
      mesh: the :class:`Mesh`.
      bucket_numel: target scalars per bucket (Megatron uses ~40M; tests use small buckets).
      overlap: start each bucket's reduction from a gradient hook during backward.
      reduce: ``"all_reduce"`` (every rank gets the full summed gradient) or
        ``"reduce_scatter"`` (each rank gets only its shard's sum: the distributed optimizer's input;
        the rest of the buffer is then meaningless).
      pad: shard count the buckets are padded for (dp size for ``reduce_scatter``).
      grad_dtype: dtype of the buckets; None = the parameters' dtype. ``torch.float32`` with
        bf16/fp16 parameters accumulates the micro-batches' gradients in fp32 (Megatron's
        ``--accumulate-allreduce-grads-in-fp32``): a hook adds each fresh low-precision ``.grad``
        into the fp32 bucket and clears it, so ``.grad`` stays None and :meth:`grads` is the
        way to read the gradients.
      deterministic: sum every bucket over dp in a fixed order, rank 0 + rank 1 + ... left to
        right (an all-to-all of the bucket's pieces, a local ordered sum, then an all-gather for
        ``all_reduce``), instead of the backend's own reduction, whose order depends on its
        algorithm (a ring starts each chunk at another rank; NCCL / HCCL pick ring or tree by
        message size and topology). Same communication volume as a ring all-reduce; one extra
        bucket-sized buffer while reducing.

    The object holds per-step mutable bookkeeping (hook counters, pending handles); it is created
    explicitly by the caller, never module-level.
    """

    def __init__(self, params, mesh: Mesh, *, bucket_numel: int = 40_000_000, overlap: bool = False,
                 reduce: str = "all_reduce", pad: int | None = None, grad_dtype: torch.dtype | None = None,
                 deterministic: bool = False):
        if reduce not in ("all_reduce", "reduce_scatter"):
            raise ValueError(f"DataParallel.reduce must be 'all_reduce' or 'reduce_scatter', got {reduce!r}")
        self.mesh = mesh
        self.group = mesh.group("dp")
        self.dp = mesh.size("dp")
        self.overlap = bool(overlap)
        self.reduce = reduce
        self.deterministic = bool(deterministic)
        pad = pad or (self.dp if reduce == "reduce_scatter" else 1)
        if reduce == "reduce_scatter" and pad != self.dp:
            raise ValueError(f"DataParallel: reduce_scatter needs buckets padded for dp={self.dp}, got pad={pad}")
        self.leaves = tree.leaves(params)
        self.layout = bucket_layout(params, bucket_numel=bucket_numel, pad=pad)
        dtypes = {self.leaves[i].dtype for m in self.layout.members for i in m}
        if len(dtypes) > 1:
            raise ValueError(f"DataParallel: trainable leaves have mixed dtypes {dtypes}; one gradient dtype expected")
        pdtype = dtypes.pop() if dtypes else torch.float32
        dtype = grad_dtype or pdtype
        # Separate buffers (and an accumulate hook) only when the gradient dtype differs.
        self.separate = dtype != pdtype
        device = self.leaves[self.layout.members[0][0]].device if self.layout.members else None
        self.buffers = [torch.zeros(n, dtype=dtype, device=device) for n in self.layout.sizes]
        self._ready = [0] * len(self.buffers)
        self._handles: dict[int, tuple] = {}
        self._sync = True
        self.reductions = 0  # collectives launched so far (tests check "once per step")
        self._hooks = []
        self._views = [None] * len(self.leaves)
        for i, t in enumerate(self.leaves):
            if self.layout.index[i] is None:
                continue
            b, off, n = self.layout.index[i]
            view = self._views[i] = self.buffers[b][off:off + n].view_as(t)
            if self.separate:
                t.grad = None
                self._hooks.append(t.register_post_accumulate_grad_hook(self._make_accumulate(view)))
            else:
                t.grad = view
            if self.overlap:
                self._hooks.append(t.register_post_accumulate_grad_hook(self._make_hook(b)))

    def grads(self, params):
        """The gradients as a tree shaped like ``params`` (bucket views; None for frozen leaves)."""
        return tree.unflatten(list(self._views), tree.structure(params))

    # ------------------------------------------------------------------ hooks and reduction
    @staticmethod
    def _make_accumulate(view: torch.Tensor):
        def hook(param):
            with torch.no_grad():
                view.add_(param.grad)
            param.grad = None
        return hook

    def _make_hook(self, b: int):
        def hook(_param):
            self._ready[b] += 1
            if self._sync and self._ready[b] == len(self.layout.members[b]):
                self._launch(b)
        return hook

    def _launch(self, b: int) -> None:
        if b in self._handles:
            return
        buf = self.buffers[b]
        self.reductions += 1
        if self.group is None:
            self._handles[b] = (None, None)
            return
        if self.deterministic:
            self._handles[b] = _ordered_launch(buf, self.dp, self.group)
        elif self.reduce == "all_reduce":
            self._handles[b] = (dist.all_reduce(buf, group=self.group, async_op=True), None)
        else:
            lo, hi = self.layout.shard_range(b, self.mesh.rank("dp"))
            out = torch.empty(hi - lo, dtype=buf.dtype, device=buf.device)
            work = comm._reduce_scatter_single(out, buf, group=self.group, async_op=True)
            self._handles[b] = (work, out)

    def finish(self) -> None:
        """Complete the reduction of every bucket (launching those no hook started)."""
        for b in range(len(self.buffers)):
            self._launch(b)
        for b, (work, out) in sorted(self._handles.items()):
            if work is not None:
                work.wait()
            if isinstance(out, _Ordered):
                _ordered_finish(self.buffers[b], out, self.dp, self.group, gather=self.reduce == "all_reduce")
            elif out is not None:
                lo, hi = self.layout.shard_range(b, self.mesh.rank("dp"))
                self.buffers[b][lo:hi].copy_(out)
        self._handles.clear()
        self._ready = [0] * len(self.buffers)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients without reducing (every micro-batch but the step's last)."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True
            self._ready = [0] * len(self.buffers)

    def zero_grad(self) -> None:
        """Zero the buckets (the ``.grad`` views stay attached)."""
        for i, t in enumerate(self.leaves):
            b = self.layout.index[i]
            if b is not None and not self.separate and (
                    t.grad is None or t.grad.data_ptr() != self.buffers[b[0]][b[1]:].data_ptr()):
                raise RuntimeError("DataParallel: a parameter's .grad was replaced (set to None?); use "
                                   "DataParallel.zero_grad instead of clearing .grad yourself")
        for buf in self.buffers:
            buf.zero_()
        self._ready = [0] * len(self.buffers)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# ----------------------------------------------------------------------------- fixed-order reduction
class _Ordered(tuple):
    """``(received pieces (dp, n), padded size)`` of a bucket reduced in rank order."""


def _ordered_launch(buf: torch.Tensor, dp: int, group):
    """Start a fixed-order reduction: every rank sends piece ``j`` of its bucket to dp rank ``j``
    (one all-to-all), so each rank holds all ``dp`` contributions to its piece."""
    size = -(-buf.numel() // dp) * dp
    send = buf if size == buf.numel() else torch.cat([buf, buf.new_zeros(size - buf.numel())])
    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    return work, _Ordered((recv.view(dp, size // dp), size))


def _ordered_finish(buf: torch.Tensor, got: "_Ordered", dp: int, group, *, gather: bool) -> None:
    """Sum the contributions left to right in dp-rank order (the order of a one-process loop over
    the ranks), then all-gather the summed pieces (all-reduce) or keep this rank's (reduce-scatter).
    The result is the same bits on every run and every rank, whatever order the backend's own
    reduction (ring / tree, chunked by message size) would have used."""
    parts, size = got
    piece = parts[0].clone()
    for j in range(1, dp):
        piece += parts[j]
    if gather:
        full = torch.empty(size, dtype=buf.dtype, device=buf.device)
        dist.all_gather_into_tensor(full, piece, group=group)
        buf.copy_(full[:buf.numel()])
    else:
        r = dist.get_rank(group)
        n = size // dp
        buf[r * n:(r + 1) * n].copy_(piece)
