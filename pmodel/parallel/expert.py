"""Expert parallelism as a transform: experts split over the mesh's ``ep`` dimension.

``expert_parallel(model, mesh)`` extends the model's layout (:mod:`pmodel.parallel.layout`) with
the rule ``experts -> ep``: an MoE layer's stacked expert weights ``(E, out, in)`` are cut on
dim 0, rank ``r`` of ``ep`` holding experts ``[r * E/ep, (r + 1) * E/ep)``, each local shard
wrapped in :class:`ExpertParallel`. The decoder stays parallel-agnostic: it sorts its tokens by
expert and calls ``ops.grouped_mlp(xs, counts, gate, up, down)``; the wrapper implements that op
(the weight protocol of :mod:`pmodel.ops.weights`) by

1. exchanging the per-expert row counts (all-to-all), then the rows themselves (an autograd
   all-to-all with uneven splits: rows for expert ``e`` go to the rank holding it);
2. regrouping the received rows by local expert and running the local experts' grouped SwiGLU;
3. sending the outputs back with the inverse all-to-all (backward: the two exchanges reversed).

The ``ep`` ranks see different tokens (they are data-parallel for everything but the experts,
as Megatron folds EP into DP): every non-expert gradient is summed over ``ep`` after backward,
which the transform contributes to the layout as a :class:`~.layout.GradReduction` named
``expert_data_parallel`` (the train step runs it with the others); an expert's gradient is not
(its placement's ``data`` dims leave ``ep`` out). Composes with tensor parallelism (attention
and the dense parts; experts are not split over tp) and data parallelism / ZeRO-1 over ``dp``.
Router statistics (the auxiliary losses) are per rank's micro-batch, as in one process running
the same micro-batches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ops, tree
from ..ops.weights import WeightWrapper
from ..params import is_decl
from .layout import GradReduction, Layout, Wrapping, layout_of
from .mesh import Mesh

__all__ = ["ExpertParallel", "expert_parallel", "all_to_all_rows", "ep_size_problems"]


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send: list, recv: list, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty(sum(ctx.send), *g.shape[1:])
        dist.all_to_all_single(out, g.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Rows ``x[sum(send[:r]) : sum(send[:r+1])]`` go to rank ``r``; ``recv[r]`` rows arrive from
    rank ``r``, stacked in rank order (autograd: the inverse exchange backward)."""
    return _AllToAllRows.apply(x, list(send), list(recv), group)


class ExpertParallel(WeightWrapper):
    """This rank's experts of a stacked expert weight ``(E/ep, out, in)``; the gate projection's
    wrapper implements ``grouped_mlp`` (see the module docstring)."""

    __slots__ = ("shard", "group")

    def __init__(self, shard, *, group):
        self.shard = shard
        self.group = group

    @property
    def shape(self):
        return tuple(self.shard.shape)

    def main_tensor(self):
        return self.shard

    def map_rows(self, f):
        return ExpertParallel(f(self.shard), group=self.group)

    def linear(self, x, bias=None, *, kernels=None, in_shard=None):
        raise NotImplementedError("ExpertParallel holds stacked expert weights; use ops.grouped_mlp")

    def grouped_mlp(self, xs: torch.Tensor, counts: torch.Tensor, up, down, *, kernels=None) -> torch.Tensor:
        """``xs`` ``(M, D)`` rows grouped by global expert, ``counts`` ``(E,)`` -> ``(M, D)``."""
        g = self.group
        ep = dist.get_world_size(g)
        E = counts.numel()
        El = E // ep
        send = counts.reshape(ep, El).contiguous()                    # rows for each rank's experts
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=g)                   # (ep, El): from src r, per local expert
        send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
        xr = all_to_all_rows(xs, send_rows, recv_rows, g)             # rows in (src, local expert) order
        seg = torch.repeat_interleave(torch.arange(ep * El, device=xs.device), recv.reshape(-1))
        perm = torch.argsort((seg % El) * ep + seg // El, stable=True)  # -> (local expert, src) order
        inv = torch.argsort(perm)
        y = ops.grouped_mlp(xr[perm], recv.sum(0), self.shard, _local(up), _local(down), kernels=kernels)
        return all_to_all_rows(y[inv], recv_rows, send_rows, g)       # back to the senders, in their order


def _local(w):
    return w.shard if isinstance(w, ExpertParallel) else w


tree.register_node(ExpertParallel, lambda o: ([o.shard], (o.group,)),
                   lambda kids, st: ExpertParallel(kids[0], group=st[0]), ("shard",))


def ep_size_problems(cfg, ep: int) -> list[str]:
    """Why ``expert_parallel`` would refuse an ``ep``-way split of ``cfg`` (empty when it would not)."""
    out = []
    if ep > 1 and not cfg.num_experts:
        out.append(f"expert parallel size {ep} needs a mixture-of-experts model (num_experts > 0)")
    elif ep > 1 and cfg.num_experts % ep:
        out.append(f"num_experts={cfg.num_experts} is not divisible by expert parallel size {ep}")
    return out


def expert_parallel(model, mesh: Mesh):
    """Split ``model``'s experts over the mesh's ``ep`` dimension (see the module docstring).

    Apply before :func:`~pmodel.parallel.tensor.tensor_parallel` / ``parallelize`` (which apply
    TP to the result). With ``ep == 1`` the model is unchanged (the transform is recorded).

    Raises:
      ValueError: the model has no experts, ``num_experts`` is not divisible by ep, or the
        transform is applied twice.
    """
    if "expert_parallel" in model.transforms:
        raise ValueError(f"expert_parallel is already applied (transforms {model.transforms})")
    ep = mesh.size("ep")
    problems = ep_size_problems(model.config, ep)
    if problems:
        raise ValueError("expert_parallel: " + "; ".join(problems))
    if ep == 1:
        return model.replace(transforms=model.transforms + ("expert_parallel",))
    base = layout_of(model) or Layout(mesh=mesh)
    if base.mesh is not mesh:
        raise ValueError("expert_parallel: the model's layout was built for another mesh")
    group = mesh.group("ep")
    wrapping = Wrapping(name="expert_parallel", claims=lambda s: "ep" in s.dims,
                        wrap=lambda s, t: ExpertParallel(t, group=group))
    # Composite expert weights (LoRA on the experts: base, a, b each cut on the expert dim): the
    # children stay plain shards and the whole composite is wrapped when the block runs.
    comps = [p for p, n in tree.paths(model.defs, is_leaf=lambda x: is_decl(x) or ops.is_wrapper(x))
             if ops.is_wrapper(n) and ".mlp.experts." in p]
    layout = base.extend(rules={"experts": "ep"}, wrappings=(wrapping,), composites=comps)
    dense = [p for p, d in tree.paths(model.defs, is_leaf=is_decl) if "ep" not in layout.placement(p, d).dims]
    layout = layout.extend(reductions=(GradReduction(name="expert_data_parallel", dim="ep", paths=dense),))
    out = model.replace(layout=layout, transforms=model.transforms + ("expert_parallel",))
    if comps:
        inner = model.block

        def block(p, h, ctx, layer):
            ex = p["mlp"]["experts"]
            wrapped = {k: ExpertParallel(v, group=group) if ops.is_wrapper(v) and not isinstance(v, ExpertParallel)
                       else v for k, v in ex.items()}
            return inner(dict(p, mlp=dict(p["mlp"], experts=wrapped)), h, ctx, layer)
        out = out.replace(block=block)
    return out
