"""Layout as data: where every parameter lives on the mesh, from logical-axis rules.

A :class:`Layout` maps logical axes to mesh dimensions (haliax-style resource rules, e.g.
:data:`TP_RULES` ``{"heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp"}``, plus
``{"experts": "ep"}`` from an expert-parallel transform) and from that alone answers, for any
declaration at a global dotted path (``layers.0.attn.q_proj.weight``, or a child of a composite
weight such as ``layers.0.attn.q_proj.weight.a``), in a :class:`Placement`:

* its **local shard**: which global index range of each dimension this rank holds
  (:meth:`Layout.leaf_slice`; a slice of the full keyed draw, so init, checkpoints and
  resharding agree), and which rank writes a piece held by several (:meth:`Layout.is_primary`);
* its **role** under tensor parallelism: ``"column"`` (``[out, in]`` split on ``out``),
  ``"row"`` (split on ``in``), ``"vocab"``, ``"column_bias"`` (a vector split like its
  weight's rows), ``"kv_replica"`` / ``"kv_replica_bias"`` (fewer units than ranks: each unit,
  e.g. a K/V head, held by ``tp / units`` consecutive ranks), or ``"replicated"`` (not split over
  tp; it may still be split over another dimension, see ``dims``);
* which **gradient reductions** it needs: an after-backward all-reduce of partial sums over a
  model-parallel dimension (``partial``, contributed by transforms as :class:`GradReduction`
  records: sequence-parallel norm weights and row biases, the replicated factors of a sharded
  composite weight such as LoRA's), the data-parallel dimensions its gradient is summed over
  (``data``), and the weight of its squared gradient in the global norm (``norm_weight``).

Transforms build the layout together: each one :meth:`Layout.extend` s it with its rules, the
wrapper leaves it puts around its shards (:class:`Wrapping`) and its after-backward work
(:class:`GradReduction`); a train step calls :meth:`Layout.sync_grads` once after backward and
never needs to know which transform asked for what. :func:`pmodel.init` materialises local
shards through the layout (it is the ``(path, decl, full) -> leaf`` init hook).
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable, Mapping

import torch

from .. import ops, tree
from ..params import AXES, P, is_decl
from . import comm
from .mesh import DIMS, Mesh

__all__ = [
    "TP_RULES", "SHARD_DIMS", "DATA_DIMS", "Placement", "Wrapping", "GradReduction", "Layout",
    "layout_of", "composite_paths", "shard_params", "sync_replicated_grads",
]

# Tensor parallelism: the decoder's attention heads, MLP width and vocabulary split over tp.
TP_RULES: Mapping[str, str] = types.MappingProxyType({"heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp"})
# Mesh dimensions a parameter may be split over (dp / cp / pp split data or layers, not tensors).
SHARD_DIMS: tuple[str, ...] = ("tp", "ep")
# Mesh dimensions whose ranks see different tokens: a gradient is summed over every one of them
# that does not split the leaf (an expert's gradient is not summed over ep).
DATA_DIMS: tuple[str, ...] = ("cp", "ep", "dp")
# Mesh dimensions a piece can be held identically along (pp splits by leaf, not by copy).
COPY_DIMS: tuple[str, ...] = ("tp", "cp", "ep", "dp")

_MATRIX_ROLES = ("column", "kv_replica", "row", "vocab")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one leaf lives under a :class:`Layout` (on this rank).

    Attributes:
      path: the global dotted path.
      shape: the full (global) shape.
      role: the tensor-parallel role (see the module docstring).
      dims: per tensor dim, the mesh dim it is split over (None: whole).
      index: per tensor dim, the global index range this rank holds.
      replica: ``(slot, slots)`` when units are replicated over tp (``kv_replica*``): this rank
        holds unit ``slot`` of ``slots``; else None.
      copies: ``{mesh dim: ranks along it holding this rank's identical piece}`` for
        :data:`COPY_DIMS` (1: every rank a different piece; the dim's size: replicated).
      partial: mesh dims its gradient must be all-reduced over after backward (partial sums).
      data: mesh dims its gradient is summed over by data parallelism.
      norm_weight: factor of its squared gradient in the global norm summed over
        :attr:`Layout.norm_dims` (``1 / copies`` over those dims).
      composite: path of the composite weight (e.g. LoRA node) holding this leaf, or None.
    """

    path: str
    shape: tuple[int, ...]
    role: str
    dims: tuple[str | None, ...]
    index: tuple[slice, ...]
    replica: tuple[int, int] | None
    copies: Mapping[str, int]
    partial: tuple[str, ...]
    data: tuple[str, ...]
    norm_weight: float
    composite: str | None

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.index)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wrapping:
    """A transform's wrapper leaves: which local shards it wraps at init, and how.

    Attributes:
      name: the transform (for error messages).
      claims: ``spec -> bool``: whether this transform wraps the leaf.
      wrap: ``(spec, local_tensor) -> leaf`` (e.g. ``ColumnParallel(local_tensor, ...)``).
    """

    name: str
    claims: Callable[[Placement], bool]
    wrap: Callable[[Placement, torch.Tensor], Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradReduction:
    """After-backward work a transform contributes: sum the partial gradients of ``paths`` over
    the mesh dim ``dim`` (each rank holds only its part of their gradient).

    Attributes:
      name: why (``"sequence_parallel"``, ``"composite_replicated"``, ...).
      dim: the mesh dimension (``"tp"``).
      paths: global dotted paths of the leaves.
    """

    name: str
    dim: str
    paths: frozenset

    def __post_init__(self):
        object.__setattr__(self, "paths", frozenset(self.paths))
        if self.dim not in DIMS:
            raise ValueError(f"GradReduction {self.name!r}: unknown mesh dim {self.dim!r}; expected one of {DIMS}")


def _frozen_map(d: Mapping | None) -> Mapping:
    return types.MappingProxyType(dict(d or {}))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Layout:
    """How a model's parameters are laid out on the mesh (also the model's init hook).

    Attributes:
      mesh: the :class:`Mesh`.
      rules: ``{logical axis: mesh dim}`` (e.g. :data:`TP_RULES`, ``{"experts": "ep"}``); mesh
        dims must be in :data:`SHARD_DIMS`.
      units: ``{logical axis: number of indivisible units}`` (``{"heads": H, "kv_heads": G}``):
        an axis is split only at unit boundaries, and an axis with fewer units than ranks is
        replicated per unit (unit ``u`` on ``size / units`` consecutive ranks).
      composites: paths of composite weights in the declarations (wrapper nodes such as
        ``LoRA(P, P, P)``): their children are cut like any leaf but kept plain at init, because
        the transform wraps the whole composite when the model runs.
      wrappings: the wrapper leaves transforms put around local shards at init.
      reductions: after-backward gradient reductions transforms contributed.
    """

    mesh: Mesh
    rules: Mapping[str, str] = dataclasses.field(default_factory=dict)
    units: Mapping[str, int] = dataclasses.field(default_factory=dict)
    composites: frozenset = frozenset()
    wrappings: tuple[Wrapping, ...] = ()
    reductions: tuple[GradReduction, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "rules", _frozen_map(self.rules))
        object.__setattr__(self, "units", _frozen_map(self.units))
        object.__setattr__(self, "composites", frozenset(self.composites))
        object.__setattr__(self, "wrappings", tuple(self.wrappings))
        object.__setattr__(self, "reductions", tuple(self.reductions))
        for axis, dim in self.rules.items():
            if axis is None or axis not in AXES:
                raise ValueError(f"Layout: rule for unknown logical axis {axis!r}; expected one of "
                                 f"{sorted(a for a in AXES if a)}")
            if dim not in SHARD_DIMS:
                raise ValueError(f"Layout: rule {axis!r} -> {dim!r}: parameters can only be split over "
                                 f"{SHARD_DIMS} (dp, cp and pp split data or layers)")
        for axis, n in self.units.items():
            if int(n) <= 0:
                raise ValueError(f"Layout: units of {axis!r} must be positive, got {n}")

    # ------------------------------------------------------------------ composition
    def extend(self, *, rules: Mapping[str, str] | None = None, units: Mapping[str, int] | None = None,
               composites=(), wrappings: tuple[Wrapping, ...] = (),
               reductions: tuple[GradReduction, ...] = ()) -> "Layout":
        """A layout with another transform's contributions added.

        Raises:
          ValueError: when a rule or unit count contradicts one already there.
        """
        for name, old, new in (("rule", self.rules, rules or {}), ("units", self.units, units or {})):
            clash = {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v}
            if clash:
                raise ValueError(f"Layout.extend: {name} {clash} contradict the existing layout (old, new)")
        return dataclasses.replace(self, rules={**self.rules, **(rules or {})}, units={**self.units, **(units or {})},
                                   composites=self.composites | frozenset(composites),
                                   wrappings=self.wrappings + tuple(wrappings),
                                   reductions=self.reductions + tuple(reductions))

    @property
    def norm_dims(self) -> tuple[str, ...]:
        """Mesh dims the global gradient norm is summed over (besides pp): those the rules split."""
        return tuple(d for d in DIMS if d in set(self.rules.values()))

    def group(self, dim: str):
        return self.mesh.group(dim)

    # ------------------------------------------------------------------ per leaf
    def composite_of(self, path: str) -> str | None:
        """The composite weight holding ``path`` (the nearest enclosing one), or None."""
        head = path
        while "." in head:
            head = head.rpartition(".")[0]
            if head in self.composites:
                return head
        return None

    def placement(self, path: str, decl: P) -> Placement:
        """The :class:`Placement` of the declaration ``decl`` at global path ``path``.

        Raises:
          ValueError: a split dimension is not divisible (by the ranks, or at unit boundaries),
            or two tensor dims map to one mesh dim.
          NotImplementedError: a declaration tensor parallelism has no role for (tp on a dim
            other than the last two, a vocab-sized vector, vocab on the input axis).
        """
        dims = tuple(self.rules.get(a) if a is not None else None for a in decl.axes)
        used = [d for d in dims if d is not None]
        if len(set(used)) != len(used):
            raise ValueError(f"Layout: {path} axes {decl.axes} map two dims onto one mesh dim ({dims})")
        copies = {d: self.mesh.size(d) for d in COPY_DIMS}
        index, replica = [], None
        for i, (size, axis, dim) in enumerate(zip(decl.shape, decl.axes, dims)):
            if dim is None:
                index.append(slice(0, size))
                continue
            n, c = self.mesh.size(dim), self.mesh.rank(dim)
            u = self.units.get(axis)
            if u is not None and u < n:
                # Fewer units than ranks: unit `slot` lives on ranks [slot * k, (slot + 1) * k).
                if n % u or size % u:
                    raise ValueError(f"Layout: {path} dim {i} ({axis}: {u} units, size {size}) cannot be "
                                     f"replicated over {dim}={n} (one must divide the other)")
                k = n // u
                slot, block = c // k, size // u
                index.append(slice(slot * block, (slot + 1) * block))
                copies[dim] = k
                if dim == "tp":
                    replica = (slot, u)
                continue
            if size % n or (u is not None and u % n):
                what = f"{u} units" if u is not None and u % n else f"size {size}"
                raise ValueError(f"Layout: {path} dim {i} ({axis}, {what}) is not divisible by {dim}={n}")
            block = size // n
            index.append(slice(c * block, (c + 1) * block))
            copies[dim] = 1
        role = _tp_role(path, decl, dims, replica is not None)
        partial = tuple(d for d in DIMS if any(r.dim == d and path in r.paths for r in self.reductions))
        data = tuple(d for d in DATA_DIMS if d not in dims)
        norm_weight = 1.0 / math.prod(copies[d] for d in self.norm_dims if d in copies)
        return Placement(path=path, shape=tuple(decl.shape), role=role, dims=dims, index=tuple(index),
                        replica=replica, copies=types.MappingProxyType(copies), partial=partial, data=data,
                        norm_weight=norm_weight, composite=self.composite_of(path))

    def role(self, path: str, decl: P) -> str:
        """The tensor-parallel role of a declaration (see :class:`Placement`)."""
        return self.placement(path, decl).role

    def leaf_slice(self, path: str, decl: P) -> tuple[slice, ...]:
        """The global index range (one slice per dim) of the full tensor this rank holds."""
        return self.placement(path, decl).index

    def is_primary(self, path: str, decl: P, *, over: tuple[str, ...] = ("tp", "cp", "ep")) -> bool:
        """True on exactly one rank among those (along the dims ``over``) holding identical copies
        of this rank's piece: the first copy (tp rank 0 for a replicated leaf, the first replica
        of a K/V head), so a checkpoint writes each piece once.

        Args:
          over: the mesh dims to consider. The default leaves out dp (and pp): params are
            identical over dp, but a distributed optimizer's state is not, so the caller decides
            there; pass ``COPY_DIMS`` to include dp (then dp rank 0 is the primary).
        """
        spec = self.placement(path, decl)
        return all(self.mesh.rank(d) % spec.copies[d] == 0 for d in over)

    def norm_weight(self, path: str, decl: P) -> float:
        return self.placement(path, decl).norm_weight

    def local(self, path: str, decl: P, full: torch.Tensor) -> Any:
        """The leaf this rank keeps of the full tensor ``full`` (a copy, so the full draw can be
        freed), wrapped by the transform that claims it (a composite's children stay plain)."""
        if tuple(full.shape) != tuple(decl.shape):
            raise ValueError(f"Layout: {path} has shape {tuple(full.shape)}, the model declares {decl.shape}")
        spec = self.placement(path, decl)
        whole = spec.local_shape == spec.shape
        part = full if whole else full[spec.index].clone()
        if spec.composite is not None:
            return part  # the transform wraps the whole composite when the model runs
        made = [w for w in self.wrappings if w.claims(spec)]
        if len(made) > 1:
            raise ValueError(f"Layout: {path} is claimed by several transforms: {[w.name for w in made]}")
        return made[0].wrap(spec, part) if made else part

    def __call__(self, path: str, decl: P, full: torch.Tensor) -> Any:
        """The init hook of :func:`pmodel.init`: :meth:`local`."""
        return self.local(path, decl, full)

    # ------------------------------------------------------------------ gradients
    def partial_grads(self, defs) -> dict[str, list[str]]:
        """``{mesh dim: [paths]}`` of the leaves of ``defs`` whose gradients are partial sums over
        that dim (every contributed :class:`GradReduction`, each leaf once), in defs order."""
        out: dict[str, list[str]] = {}
        for path, _ in tree.paths(defs, is_leaf=is_decl):
            for dim in DIMS:
                if any(r.dim == dim and path in r.paths for r in self.reductions):
                    out.setdefault(dim, []).append(path)
        return out

    @torch.no_grad()
    def sync_grads(self, model_or_defs, params) -> None:
        """Run every transform's after-backward gradient work: all-reduce the partial gradients
        (``.grad``) of :meth:`partial_grads` over their mesh dim, one flat buffer per dim.

        Call once after backward (after the last micro-batch; before or after the data-parallel
        reduction: both are sums). Calling it twice would double those gradients.

        Args:
          model_or_defs: the model (its ``defs``) or a declarations tree, e.g. a pipeline stage's
            subset (``layers`` a dict keyed by the global layer index): paths are global.
          params: the matching params (gradients in ``.grad``).
        """
        defs = getattr(model_or_defs, "defs", model_or_defs)
        todo = self.partial_grads(defs)
        if not todo:
            return
        flat = dict(tree.paths(params))
        # a declared leaf held in a one-tensor wrapper (ColumnParallel, ExpertParallel) by its declared path
        for p, node in tree.paths(params, is_leaf=ops.is_wrapper):
            kids = tree.leaves(node) if ops.is_wrapper(node) else ()
            if p not in flat and len(kids) == 1:
                flat[p] = kids[0]
        for dim, paths in todo.items():
            missing = [p for p in paths if p not in flat]
            if missing:
                raise KeyError(f"Layout.sync_grads: params lack declared leaves, e.g. {missing[:3]}")
            live = [g for g in (flat[p].grad for p in paths) if g is not None]
            if not live:
                continue
            buf = torch.cat([g.reshape(-1).float() for g in live])
            buf = comm.all_reduce(buf, self.mesh.group(dim))
            off = 0
            for g in live:
                n = g.numel()
                g.copy_(buf[off:off + n].view_as(g))
                off += n


def _tp_role(path: str, decl: P, dims: tuple, replica: bool) -> str:
    """The tensor-parallel role from where ``tp`` falls among the dims (``[..., out, in]``)."""
    nd = len(decl.shape)
    at = [i for i, d in enumerate(dims) if d == "tp"]
    if not at:
        return "replicated"
    i, axis = at[0], decl.axes[at[0]]
    if nd == 1:
        if axis == "vocab":
            raise NotImplementedError(f"tensor parallel: vocab-sized vector {path} is not supported")
        return "kv_replica_bias" if replica else "column_bias"
    if i == nd - 2:
        if axis == "vocab":
            return "vocab"
        return "kv_replica" if replica else "column"
    if i == nd - 1 and axis != "vocab":
        if replica:
            raise NotImplementedError(f"tensor parallel: {path} would replicate units of its input axis {axis!r}")
        return "row"
    raise NotImplementedError(f"tensor parallel: no role for {path} with axes {decl.axes} (tp on dim {i} of "
                              f"{nd}; weights are [..., out, in] and vocab only on the out axis)")


# ============================================================================ helpers
def composite_paths(defs) -> list[str]:
    """Paths of the composite weights (wrapper nodes, :func:`pmodel.ops.is_wrapper`) in ``defs``."""
    return [p for p, n in tree.paths(defs, is_leaf=lambda x: is_decl(x) or ops.is_wrapper(x)) if ops.is_wrapper(n)]


def layout_of(model) -> Layout | None:
    """The :class:`Layout` of a model (None when no sharding transform was applied)."""
    return getattr(model, "layout", None)


def shard_params(model, full_params) -> Any:
    """Cut this rank's leaves out of a full params tree (e.g. from :func:`pmodel.load_hf`).

    Gives the same leaves as ``pmodel.init(model, seed)`` would from the same full values; the
    full params are returned unchanged when the model has no layout.
    """
    layout = layout_of(model)
    if layout is None:
        return full_params

    flat = dict(tree.paths(full_params))

    def cut(path, decl):
        if path not in flat:
            raise KeyError(f"shard_params: the full params have no leaf {path!r}")
        full = flat[path].detach()
        leaf = layout.local(path, decl, full)
        return tree.map(lambda x: x.detach().clone().requires_grad_(decl.trainable and x.is_floating_point()), leaf)

    return tree.map_with_path(cut, model.defs, is_leaf=is_decl)


def sync_replicated_grads(model, params) -> None:
    """``model.layout.sync_grads(model.defs, params)``: every partial-gradient reduction the
    transforms contributed (sequence-parallel norms and row biases, replicated factors of
    sharded composite weights such as LoRA's). A no-op without a layout or reductions.

    Works for a pipeline stage: pass ``model.replace(defs=stage_defs)``.
    """
    layout = layout_of(model)
    if layout is not None:
        layout.sync_grads(model.defs, params)
