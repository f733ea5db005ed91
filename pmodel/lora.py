"""LoRA as a transform: low-rank adapters on a model's linear weights.

``lora(model, rank, alpha, targets=...)`` returns a new :class:`~pmodel.model.Model` whose
declarations replace each targeted linear weight ``P`` by a :class:`LoRA` node holding three
declarations (the frozen ``base`` weight, ``a`` ``[r, in]`` and ``b`` ``[out, r]``) and mark
every other declaration frozen, as PEFT does. The model's functions are unchanged: the decoder
calls ``ops.linear(x, w)``, which hands a non-tensor weight to ``w.linear(...)``, so a
:class:`LoRA` leaf computes ``x Wᵀ + scale · (dropout(x) Aᵀ) Bᵀ`` without ever forming
``W + scale·BA``.

Because the defs and the params have the same structure, ``pmodel.init(lora_model, seed)``
materialises ``LoRA`` leaves directly; to put adapters on weights you already have (a loaded
HF checkpoint), use :func:`adapt`. Paths of the factors are ``...q_proj.weight.a`` /
``...q_proj.weight.b``; the frozen weight is ``...q_proj.weight.base``.

Composition:
  * tensor parallel: ``a`` is declared with axes ``("lora_rank", in_axis)`` and ``b`` with
    ``(out_axis, "lora_rank")``, so the mesh rules shard ``b`` with a column-parallel base and
    ``a`` with a row-parallel base. The parallel wrapper stays outermost and owns the
    communication; the LoRA it holds computes on local shards, and for a row-parallel base the
    partial low-rank products join the row-parallel reduction (the sum is linear). The factor
    that stays replicated (``a`` under column, ``b`` under row parallel) gets a partial
    gradient on each rank that has to be summed over the tensor-parallel group, like any
    replicated weight whose consumer is sharded. LoRA only speaks the weight protocol
    (:mod:`pmodel.ops.weights`): a row-parallel wrapper passes ``in_shard`` so the dropout mask
    is drawn for the full input, and ``map_rows`` exposes ``base`` and ``b`` to per-row work
    (the replicated-K/V gradient sum); :mod:`pmodel.parallel` never imports this module.
  * recompute / pipeline: LoRA is data inside the params; the model functions stay pure. Dropout
    masks come from a key bound into the params (:func:`bind_dropout`), never from the global
    RNG, so a recomputed forward draws the same mask.

Dropout is explicit: with ``dropout > 0`` the params must be bound with
``bind_dropout(params, seed=, step=)`` (training) or ``bind_dropout(params, train=False)``
(evaluation). Unbound LoRA leaves with dropout raise when they would be differentiated, so a
configured dropout can never be silently skipped.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence

import torch

from . import tree
from .ops.weights import WeightWrapper, map_rows
from .params import P, is_decl, key_for

__all__ = [
    "LoRA", "LoRASpec", "lora", "adapt", "merge", "unmerge", "base_model", "bind_dropout",
    "dropout_mask", "resolve_targets", "spec_of", "adapter_params", "load_adapter_params",
    "is_lora", "PROJECTIONS", "MODELLINK_NAMES",
]

# The seven projections of a LLaMA-style block, as named in HF checkpoints and in pmodel paths.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# ModelLink / Megatron module names (``--lora-target-modules``) -> HF projection names. Megatron
# fuses q, k, v into ``query_key_value`` and gate, up into ``dense_h_to_4h``; pmodel keeps them
# separate, so one Megatron name targets several pmodel weights.
MODELLINK_NAMES = {
    "query_key_value": ("q_proj", "k_proj", "v_proj"),
    "dense": ("o_proj",),
    "dense_h_to_4h": ("gate_proj", "up_proj"),
    "dense_4h_to_h": ("down_proj",),
}

_EVAL = "eval"  # dropout key meaning "inference: no dropout"


class LoRA(WeightWrapper):
    """A linear weight with a low-rank adapter: ``W + scale · B A`` applied without forming it.

    Implements the weight protocol (:mod:`pmodel.ops.weights`).
    A registered pytree node: its children are ``base`` (``[out, in]``, frozen), ``a``
    (``[r, in]``) and ``b`` (``[out, r]``); ``scale`` and ``dropout`` are static structure;
    ``key`` rides along outside the structure (a ``tree.map`` drops it).
    The same class holds :class:`~pmodel.params.P` declarations in a model's defs and tensors
    (or tensor shards) in its params.

    Args:
      base: the frozen weight (a tensor, a declaration, or another wrapper leaf).
      a, b: the adapter factors.
      scale: ``alpha / r`` (``alpha / sqrt(r)`` for rank-stabilised LoRA).
      dropout: probability of zeroing an input element of the adapter path (PEFT's
        ``lora_dropout``; the base path never sees dropout).
      key: None (unbound), ``"eval"`` (no dropout) or an int generator seed for the mask; set
        by :func:`bind_dropout`.
    """

    __slots__ = ("base", "a", "b", "scale", "dropout", "key")

    def __init__(self, base, a, b, scale: float, dropout: float = 0.0, key: int | str | None = None):
        self.base, self.a, self.b = base, a, b
        self.scale, self.dropout, self.key = float(scale), float(dropout), key

    def __repr__(self) -> str:
        shp = lambda t: tuple(getattr(t, "shape", ()))  # noqa: E731
        return (f"LoRA(base={shp(self.base)}, a={shp(self.a)}, b={shp(self.b)}, scale={self.scale}, "
                f"dropout={self.dropout}, key={self.key})")

    def replace(self, **kw) -> "LoRA":
        d = {s: getattr(self, s) for s in self.__slots__}
        d.update(kw)
        return LoRA(**d)

    def __getitem__(self, name: str):
        """``node["a"]``: lets dotted-path lookups (``tree.get(params, "...weight.a")``) reach a factor."""
        if name not in ("base", "a", "b"):
            raise KeyError(f"LoRA has children 'base', 'a', 'b'; got {name!r}")
        return getattr(self, name)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the adapted weight (``[out, in]`` of ``base``)."""
        return tuple(self.base.shape)

    def main_tensor(self):
        """The base weight: the LoRA reports its dtype and device (the factors may be wider)."""
        return self.base

    def map_rows(self, f) -> "LoRA":
        """``f`` applied to the tensors indexed by the output rows: ``base`` and ``b`` (not ``a``)."""
        return self.replace(base=map_rows(self.base, f), b=f(self.b))

    def _adapter_input(self, x: torch.Tensor, in_shard: tuple[int, int] | None = None) -> torch.Tensor:
        if self.dropout == 0.0 or self.key == _EVAL:
            return x
        if self.key is None:
            trains = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in (self.a, self.b))
            if trains:
                raise ValueError(
                    f"LoRA dropout {self.dropout} needs a mask key: bind one with "
                    "lora.bind_dropout(params, seed=..., step=...) for training, or "
                    "lora.bind_dropout(params, train=False) to evaluate without dropout")
            return x  # no gradient is taken: inference, where dropout is the identity
        if in_shard is None:
            keep = dropout_mask(int(self.key), x.shape, self.dropout, x.device)  # (..., in) bool
        else:
            # x holds input columns [start, start + n) of a full input of width `full` (row
            # parallel): draw the full mask and keep these columns, so it equals the
            # single-process mask (a local-shape draw would be an unrelated mask).
            start, full = in_shard
            n = x.shape[-1]
            keep = dropout_mask(int(self.key), tuple(x.shape[:-1]) + (int(full),), self.dropout, x.device)
            keep = keep[..., start:start + n]  # (..., n)
        return x * keep.to(x.dtype) / (1.0 - self.dropout)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, kernels=None,
               in_shard: tuple[int, int] | None = None) -> torch.Tensor:
        """``x Wᵀ + bias + scale · (dropout(x) Aᵀ) Bᵀ`` for ``x`` ``(..., in)`` -> ``(..., out)``.

        The base weight is frozen, so autograd computes only the input gradient through it
        (no ``[out, in]`` weight gradient). The scale multiplies the rank-r intermediate, the
        smallest tensor on the path.

        Args:
          in_shard: ``(start, full_width)`` when ``x`` and the weight hold only input columns
            ``[start, start + in)`` (row parallel): the dropout mask is then drawn for the full
            input and sliced, and the result is this shard's partial sum.
        """
        from . import ops  # late: ops dispatches back here for non-tensor weights

        y = ops.linear(x, self.base, bias, kernels=kernels, in_shard=in_shard)  # (..., out)
        xa = self._adapter_input(x, in_shard)
        dt = getattr(self.a, "dtype", xa.dtype)
        # Adapters may be kept in a wider dtype than the base (lora(..., dtype=)): compute the
        # low-rank path in the adapters' dtype and add it back in the activations' (as PEFT).
        u = ops.linear(xa.to(dt), self.a, kernels=kernels, in_shard=in_shard)  # (..., r)
        return y + ops.linear(u * self.scale, self.b, kernels=kernels).to(y.dtype)  # (..., out)

    def grouped_linear(self, xs: torch.Tensor, counts: torch.Tensor, *, kernels=None) -> torch.Tensor:
        """LoRA on stacked expert weights (``base`` ``(E, out, in)``, ``a`` ``(E, r, in)``, ``b``
        ``(E, out, r)``: one adapter per expert): ``ops.grouped_linear`` over rows grouped by
        expert, ``xs_e W_eᵀ + scale · (xs_e A_eᵀ) B_eᵀ``, as grouped matmuls (no ``W + BA``)."""
        from . import ops
        if self.dropout and self.key != _EVAL and torch.is_grad_enabled():
            raise ValueError("LoRA dropout on expert weights is not supported")
        y = ops.grouped_linear(xs, self.base, counts, kernels=kernels)                      # (M, out)
        dt = getattr(self.a, "dtype", xs.dtype)
        u = ops.grouped_linear(xs.to(dt), self.a, counts, kernels=kernels)                  # (M, r)
        return y + ops.grouped_linear(u * self.scale, self.b, counts, kernels=kernels).to(y.dtype)

    def merged(self) -> torch.Tensor:
        """``W + scale · B A`` computed in fp32 and cast back to the base dtype ``[out, in]``
        (per expert for stacked expert weights: ``[E, out, in]``)."""
        w = self.base
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"cannot merge a LoRA whose base is {type(w).__name__}; gather it first")
        delta = (self.b.detach().float() @ self.a.detach().float()) * self.scale  # (out, in)
        return (w.detach().float() + delta).to(w.dtype)


# The dropout key is deliberately not part of the tree structure: gradients of bound params
# (value_and_grad rebuilds the tree) must match the unbound params the optimizer state was made
# for. A tree.map therefore returns unbound leaves; an unbound leaf with dropout refuses to be
# differentiated, so a lost key is an error, never a silently skipped dropout.
tree.register_node(
    LoRA,
    lambda n: ([n.base, n.a, n.b], (n.scale, n.dropout)),
    lambda kids, ctx: LoRA(kids[0], kids[1], kids[2], *ctx),
    ("base", "a", "b"),
)


def is_lora(x: Any) -> bool:
    return isinstance(x, LoRA)


def dropout_mask(key: int, shape: Sequence[int], p: float, device=None) -> torch.Tensor:
    """The keep-mask LoRA dropout uses for ``key``: ``True`` with probability ``1 - p``.

    Drawn from a fresh generator seeded with ``key`` (CPU draw, then moved), so the same key
    gives the same mask on every device, in a recomputed forward, and in a test.
    """
    g = torch.Generator(device="cpu").manual_seed(int(key))
    return (torch.rand(tuple(shape), generator=g) >= p).to(device)


# ============================================================================ targets
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRASpec:
    """What a LoRA transform did, read back from a model's defs (see :func:`spec_of`).

    Attributes:
      rank, alpha, dropout, rslora: as given to :func:`lora`.
      modules: the adapted module paths (``layers.0.attn.q_proj``), in defs order.
      names: their projection names (``q_proj``, ...), sorted.
    """

    rank: int
    alpha: float
    dropout: float
    rslora: bool
    modules: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRASpec.rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRASpec.dropout must be in [0, 1), got {self.dropout}")


def _is_expert_weight(path: str, d) -> bool:
    """A stacked expert weight ``(E, out, in)`` of an MoE layer (``layers.3.mlp.experts.gate_proj``)."""
    return ".mlp.experts." in path and len(d.shape) == 3


def _module_of(path: str, d) -> str | None:
    """The module path a weight declaration adapts: ``...q_proj`` for ``...q_proj.weight``; a
    stacked expert weight is its own module (``...experts.gate_proj``)."""
    if _is_expert_weight(path, d):
        return path
    return path[: -len(".weight")] if path.endswith(".weight") else None


def _linear_modules(defs) -> list[tuple[str, P]]:
    """``(module_path, weight_decl)`` for every projection inside ``layers``: the 2-D weights (not
    an MoE router, which stays a plain tensor) and the stacked 3-D expert weights of MoE layers
    (one adapter per expert)."""
    out = []
    for path, d in tree.paths(defs, is_leaf=lambda x: is_decl(x) or is_lora(x)):
        if not path.startswith("layers."):
            continue
        inner = d.base if is_lora(d) else d
        if not ((path.endswith(".weight") and len(inner.shape) == 2) or _is_expert_weight(path, inner)):
            continue
        if path.endswith(".mlp.router.weight"):
            continue
        if is_lora(d):
            raise ValueError(f"{path} already carries a LoRA adapter; apply lora() once")
        out.append((_module_of(path, d), d))
    return out


def _family_module_names(family: str | None) -> dict[str, set[str]]:
    """The family's checkpoint module names (and every dotted suffix of them, as PEFT matches
    ``target_modules``) -> the pmodel module templates (``layers.{i}.attn.q_proj``) they hold."""
    if family is None:
        return {}
    from . import families  # lazy: families imports the model code

    out: dict[str, set[str]] = {}
    for m in families.get(family).tensors.maps:
        pieces = m.hf.split(".")
        if "{i}" not in pieces:
            continue  # embeddings, final norm, LM head: not projections
        tail = pieces[pieces.index("{i}") + 1:]
        for k in range(len(tail)):
            out.setdefault(".".join(tail[k:]), set()).update(m.ours)
    return out


def resolve_targets(defs, targets: str | Iterable[str], *, family: str | None = None) -> list[str]:
    """Module paths of ``defs`` selected by ``targets``.

    Args:
      defs: a model's declarations.
      targets: projection names (``"q_proj"``, ... or ``"all"`` / ``"all-linear"`` for the
        seven; in an MoE model ``gate_proj`` / ``up_proj`` / ``down_proj`` are the stacked expert
        weights, ``"experts"`` selects all three, and the router is never a target), ModelLink names (``"query_key_value"``, ``"dense"``, ``"dense_h_to_4h"``,
        ``"dense_4h_to_h"``), the family's own Hugging Face module names (with ``family``:
        ``"W_pack"``, ``"c_attn"``, ``"c_proj"``, ``"w1"``, ``"self_attention.dense"``, ... --
        a name, or a dotted suffix, of a checkpoint module, as PEFT's list ``target_modules``
        matches it; a fused module selects every pmodel projection it holds), a comma-separated
        string of those, or a regular expression (any other single string, ``re.fullmatch``-ed
        against module paths such as ``layers.3.attn.q_proj``, like PEFT's string
        ``target_modules``).
      family: the model's family (``Model.family``), whose tensor layout gives the HF names.

    Returns:
      the matched module paths in defs order; raises when nothing matches or a name is unknown.
    """
    mods = _linear_modules(defs)
    known = {m.rsplit(".", 1)[-1] for m, _ in mods}
    hf_names = _family_module_names(family)

    def is_name(t: str) -> bool:
        return (t in PROJECTIONS or t in MODELLINK_NAMES or t in ("all", "all-linear", "experts")
                or t in hf_names)

    if isinstance(targets, str):
        parts = [t.strip() for t in targets.split(",") if t.strip()]
        if not all(is_name(t) for t in parts):
            try:
                rx = re.compile(targets)
            except re.error as e:
                raise ValueError(f"LoRA targets {targets!r}: not a projection name and not a valid "
                                 f"regular expression ({e})") from None
            hit = [m for m, _ in mods if rx.fullmatch(m)]
            if not hit:
                raise ValueError(f"LoRA target pattern {targets!r} matches no linear module; module "
                                 f"paths look like {mods[0][0] if mods else '(none)'}")
            return hit
        targets = parts
    names: set[str] = set()
    templates: set[str] = set()  # pmodel module templates selected through HF names
    direct: set[str] = set()  # module paths selected as such
    for t in targets:
        if t in ("all", "all-linear"):
            names |= known
        elif t == "experts":
            direct |= {m for m, d in mods if _is_expert_weight(m, d)}
            if not direct:
                raise ValueError("LoRA target 'experts': the model has no mixture-of-experts layers")
        elif t in MODELLINK_NAMES:
            mapped = [n for n in MODELLINK_NAMES[t] if n in known]
            # GeLU MLPs have no gate: dense_h_to_4h is then up_proj alone.
            if not mapped:
                raise ValueError(f"LoRA target {t!r} maps to {MODELLINK_NAMES[t]}, none of which this "
                                 f"model has (it has {sorted(known)})")
            names.update(mapped)
        elif t in PROJECTIONS:
            if t not in known:
                raise ValueError(f"LoRA target {t!r} does not exist in this model (it has {sorted(known)})")
            names.add(t)
        elif t in hf_names:
            templates |= hf_names[t]
        else:
            hf = sorted(n for n in hf_names if "." not in n)
            raise ValueError(f"unknown LoRA target {t!r}; expected one of {list(PROJECTIONS)}, "
                             f"{list(MODELLINK_NAMES)}, 'all', "
                             + (f"the {family} checkpoint module names {hf}, " if hf else "")
                             + "or a single regex string")
    from .families.tensors import _template
    hit = [m for m, _ in mods if m.rsplit(".", 1)[-1] in names or _template(m)[0] in templates or m in direct]
    if not hit:
        raise ValueError(f"LoRA targets {sorted(names | templates)} match no linear module")
    return hit


# ============================================================================ the transform
def lora(model, rank: int, alpha: float, dropout: float = 0.0,
         targets: str | Iterable[str] = ("q_proj", "v_proj"), *, rslora: bool = False,
         dtype: torch.dtype | None = None):
    """Add LoRA adapters to ``model``'s targeted linear weights and freeze everything else.

    Args:
      model: a :class:`~pmodel.model.Model`.
      rank: adapter rank r.
      alpha: scaling numerator; the adapter is multiplied by ``alpha / r`` (``alpha / sqrt(r)``
        with ``rslora``).
      dropout: PEFT's ``lora_dropout`` on the adapter input (needs :func:`bind_dropout` to train).
      targets: see :func:`resolve_targets` (default ``q_proj, v_proj``, PEFT's LLaMA default).
      rslora: rank-stabilised scaling (PEFT ``use_rslora``).
      dtype: adapter dtype; default the base weight's (as PEFT).

    Returns:
      a new Model: ``A`` initialised ``kaiming_uniform(a=sqrt(5))`` as PEFT does, ``B`` zeros,
      every original declaration ``trainable=False``. Apply it before parallel transforms.
    """
    if int(rank) <= 0:
        raise ValueError(f"lora: rank must be positive, got {rank}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"lora: dropout must be in [0, 1), got {dropout}")
    if float(alpha) <= 0:
        raise ValueError(f"lora: alpha must be positive, got {alpha}")
    if model.layout is not None:
        raise ValueError("lora: apply lora() before sharding transforms such as tensor_parallel (the "
                         "parallel wrappers must stay outermost around the LoRA leaf)")
    mods = set(resolve_targets(model.defs, targets, family=model.family))
    scale = float(alpha) / (math.sqrt(rank) if rslora else rank)

    def frozen(d: P) -> P:
        return d.replace(trainable=False)

    experts = sorted(m for m in mods if m.rsplit(".", 2)[-2] == "experts")
    if experts and float(dropout):
        raise ValueError(f"lora: dropout {dropout} with adapters on expert weights ({experts[0]}, ...): LoRA dropout "
                         "on experts is not supported (PEFT's ParamWrapper refuses it too); use dropout=0 or "
                         "target the attention projections only")

    def adapt_decl(path: str, d: P):
        mod = _module_of(path, d)
        if mod not in mods:
            return frozen(d)
        dt = dtype or d.dtype
        if len(d.shape) == 3:  # stacked experts (E, out, in): one (r, in) / (out, r) pair per expert
            E, out_f, in_f = d.shape
            ex_ax, out_ax, in_ax = d.axes
            a = P(shape=(E, rank, in_f), axes=(ex_ax, "lora_rank", in_ax), init="kaiming_uniform", dtype=dt)
            b = P(shape=(E, out_f, rank), axes=(ex_ax, out_ax, "lora_rank"), init="zeros", dtype=dt)
            return LoRA(frozen(d).replace(key=d.key or path), a, b, scale, float(dropout))
        out_f, in_f = d.shape
        out_ax, in_ax = d.axes
        a = P(shape=(rank, in_f), axes=("lora_rank", in_ax), init="kaiming_uniform", dtype=dt)
        b = P(shape=(out_f, rank), axes=(out_ax, "lora_rank"), init="zeros", dtype=dt)
        # the base keeps its original init key, so pmodel.init gives it the plain model's values
        return LoRA(frozen(d).replace(key=d.key or path), a, b, scale, float(dropout))

    defs = tree.map_with_path(adapt_decl, model.defs, is_leaf=is_decl)
    return model.replace(defs=defs, transforms=tuple(model.transforms) + ("lora",))


def spec_of(model_or_defs) -> LoRASpec:
    """Read rank, alpha, dropout and targets back from a LoRA model's defs (or params).

    Raises if the adapters disagree on rank / scale / dropout (pmodel itself never makes such
    a model; PEFT's ``rank_pattern`` would).
    """
    defs = getattr(model_or_defs, "defs", model_or_defs)
    nodes = [(p, n) for p, n in tree.paths(defs, is_leaf=lambda x: is_lora(x) or is_decl(x)) if is_lora(n)]
    if not nodes:
        raise ValueError("spec_of: the model has no LoRA adapters")
    ranks = {int(n.a.shape[0]) for _, n in nodes}
    scales = {n.scale for _, n in nodes}
    drops = {n.dropout for _, n in nodes}
    if len(ranks) > 1 or len(scales) > 1 or len(drops) > 1:
        raise ValueError(f"spec_of: adapters differ (ranks {ranks}, scales {scales}, dropouts {drops})")
    r, s = ranks.pop(), scales.pop()
    mods = tuple(p.removesuffix(".weight") for p, _ in nodes)
    return LoRASpec(rank=r, alpha=s * r, dropout=drops.pop(), rslora=False, modules=mods,
                    names=tuple(sorted({m.rsplit(".", 1)[-1] for m in mods})))


def base_model(model):
    """The model without LoRA: each LoRA node's ``base`` declaration, all declarations trainable.

    (The decoder declares every parameter trainable; :func:`lora` froze them.)
    """
    def strip(d):
        return (d.base if is_lora(d) else d).replace(trainable=True)

    defs = tree.map(strip, model.defs, is_leaf=lambda x: is_lora(x) or is_decl(x))
    return model.replace(defs=defs, transforms=tuple(t for t in model.transforms if t != "lora"))


# ============================================================================ params
def _set_grad(t, trainable: bool):
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    return t.requires_grad_(trainable and t.is_floating_point())


def adapt(model, params, seed: int = 0, *, device=None) -> Any:
    """Put fresh adapters on existing base params (e.g. from ``load_hf``).

    Args:
      model: the LoRA model (``lora(base_model, ...)``).
      params: plain params of the base model (same structure as ``base_model(model).defs``).
      seed: adapter init seed; ``a`` at path ``p`` draws from ``key_for(seed, p)`` exactly as
        ``pmodel.init(model, seed)`` would.
      device: where to put the new factors (default: the base weight's device).

    Returns:
      params with :class:`LoRA` leaves; base tensors share storage with ``params`` but are
      detached with ``requires_grad=False`` (the originals are not modified).
    """
    from .params import draw  # one keyed draw, shared with pmodel.init

    def go(path: str, d, base_node):
        if not is_lora(d):
            if isinstance(base_node, LoRA) or not isinstance(base_node, torch.Tensor):
                raise ValueError(f"adapt: {path} should be a plain tensor, got {type(base_node).__name__}")
            return _set_grad(base_node, d.trainable)
        if not isinstance(base_node, torch.Tensor):
            raise ValueError(f"adapt: {path}.base must be a plain tensor, got {type(base_node).__name__}")
        if tuple(base_node.shape) != d.base.shape:
            raise ValueError(f"adapt: {path} has shape {tuple(base_node.shape)}, the model declares {d.base.shape}")
        dev = device if device is not None else base_node.device
        ab = []
        for name, decl in (("a", d.a), ("b", d.b)):
            t = draw(decl, f"{path}.{name}", seed, decl.dtype or base_node.dtype).to(dev)
            ab.append(_set_grad(t, decl.trainable))
        return LoRA(_set_grad(base_node, d.base.trainable), ab[0], ab[1], d.scale, d.dropout)

    is_node = lambda x: is_lora(x) or is_decl(x)  # noqa: E731
    flat_defs = tree.paths(model.defs, is_leaf=is_node)
    base_paths = dict(tree.paths(params))
    extra = sorted(set(base_paths) - {p for p, _ in flat_defs})
    if extra:
        raise ValueError(f"adapt: params have leaves the model does not declare, e.g. {extra[:3]}")
    missing = sorted(p for p, _ in flat_defs if p not in base_paths)
    if missing:
        raise ValueError(f"adapt: params lack declared leaves, e.g. {missing[:3]}")
    return tree.map_with_path(lambda p, d: go(p, d, base_paths[p]), model.defs, is_leaf=is_node)


def merge(params) -> Any:
    """Plain params: every :class:`LoRA` leaf replaced by ``W + scale · B A`` (fp32, cast back).

    Use with :func:`base_model` (``save_hf(base_model(m), merge(params), dir)``).
    """
    return tree.map(lambda n: n.merged() if is_lora(n) else n, params, is_leaf=is_lora)


def unmerge(merged, lora_params) -> Any:
    """Undo :func:`merge`: LoRA params whose base is ``merged - scale · B A`` (fp32, cast back).

    Args:
      merged: plain params (the output of ``merge``, possibly saved and reloaded).
      lora_params: params with the adapters to take out (their ``a``, ``b``, scale are used;
        their base weights are not).

    Returns:
      LoRA params (base frozen, factors as in ``lora_params``). In fp32 the base equals the
      original to rounding (``W + d - d``); in low precision the cast after merging is lossy.
    """
    flat = dict(tree.paths(merged))

    def go(path: str, n):
        if not is_lora(n):
            return flat[path]
        w = flat[path]
        delta = (n.b.detach().float() @ n.a.detach().float()) * n.scale  # (out, in)
        base = (w.detach().float() - delta).to(w.dtype)
        return n.replace(base=_set_grad(base, False))

    return tree.map_with_path(go, lora_params, is_leaf=is_lora)


def bind_dropout(params, seed: int | None = None, step: int = 0, *, train: bool = True) -> Any:
    """Params whose LoRA leaves carry this step's dropout keys (a new tree; tensors shared).

    Args:
      seed: the run seed (required when ``train``).
      step: the training step (or micro-batch counter): each step draws fresh masks.
      train: False binds "no dropout" (evaluation).

    Returns:
      the same params with ``key = key_for(seed, f"lora-dropout/{step}/{path}")`` on every
      LoRA leaf — deterministic, per weight and per step, and the same on every rank.
    """
    if train and seed is None:
        raise ValueError("bind_dropout: pass seed= (or train=False for evaluation)")

    def go(path: str, n):
        if not is_lora(n):
            return n
        return n.replace(key=key_for(seed, f"lora-dropout/{int(step)}/{path}") if train else _EVAL)

    return tree.map_with_path(go, params, is_leaf=is_lora)


def adapter_params(params) -> dict[str, torch.Tensor]:
    """``{path_of_factor: tensor}`` for every adapter factor (``...q_proj.weight.a`` / ``.b``)."""
    out = {}
    for p, n in tree.paths(params, is_leaf=is_lora):
        if is_lora(n):
            out[f"{p}.a"], out[f"{p}.b"] = n.a, n.b
    return out


def load_adapter_params(params, factors: dict[str, torch.Tensor]) -> Any:
    """Params with the adapter factors replaced by ``factors`` (``adapter_params`` keys).

    Shapes must match; every factor of ``params`` must be given. Dtype and device follow the
    existing factor; ``requires_grad`` is kept.
    """
    factors = dict(factors)

    def go(path: str, n):
        if not is_lora(n):
            return n
        new = {}
        for name in ("a", "b"):
            key = f"{path}.{name}"
            if key not in factors:
                raise KeyError(f"load_adapter_params: no value for {key}")
            t, old = factors.pop(key), getattr(n, name)
            if tuple(t.shape) != tuple(old.shape):
                raise ValueError(f"load_adapter_params: {key} has shape {tuple(t.shape)}, expected {tuple(old.shape)}")
            new[name] = t.detach().to(dtype=old.dtype, device=old.device).clone().requires_grad_(old.requires_grad)
        return n.replace(**new)

    out = tree.map_with_path(go, params, is_leaf=is_lora)
    if factors:
        raise KeyError(f"load_adapter_params: {len(factors)} factors match no LoRA leaf, e.g. {sorted(factors)[:3]}")
    return out
