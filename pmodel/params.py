"""Parameter declarations, abstract init and keyed materialisation.

A family declares every parameter as a :class:`P` before any memory exists. One declaration
drives abstract init (meta tensors), materialisation, sharding (through the logical ``axes``),
LoRA targeting (through the path) and checkpoint names.

Init is keyed by ``(seed, path)``: each leaf draws from its own generator seeded with a hash of
the seed and its dotted path, so the values do not depend on which other leaves exist, on the
order of creation, or on later sharding (a shard is cut from the same full draw).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable

import torch

from . import tree

__all__ = ["P", "init", "abstract", "key_for", "count", "is_decl", "draw"]

AXES = frozenset(
    {"vocab", "embed", "heads", "kv_heads", "head_dim", "qkv", "mlp", "experts", "lora_rank",
     "layers", "positions", None}
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class P:
    """A parameter declaration.

    Attributes:
      shape: full (unsharded) shape.
      axes: one logical axis name per dimension (``"vocab", "embed", "heads", ...`` or None).
      init: ``"normal"`` (with ``std``), ``"zeros"``, ``"ones"``, ``"kaiming_uniform"``
        (PEFT's LoRA-A init) or a callable ``(shape, generator) -> Tensor``.
      std: standard deviation for ``"normal"``.
      dtype: storage dtype; None means the model's parameter dtype.
      trainable: False for frozen leaves (they get no gradient and no optimizer state).
      key: the path the init key is derived from, when it differs from where the declaration
        sits (a transform that moves a weight, e.g. LoRA's ``...weight`` -> ``...weight.base``,
        keeps its values by keeping its key).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str | Callable = "normal"
    std: float = 0.02
    dtype: torch.dtype | None = None
    trainable: bool = True
    key: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "axes", tuple(self.axes))
        if len(self.shape) != len(self.axes):
            raise ValueError(f"P: shape {self.shape} and axes {self.axes} differ in length")
        bad = [a for a in self.axes if a not in AXES]
        if bad:
            raise ValueError(f"P: unknown logical axis {bad}; expected one of {sorted(a for a in AXES if a)}")
        if isinstance(self.init, str) and self.init not in ("normal", "zeros", "ones", "kaiming_uniform"):
            raise ValueError(f"P: unknown init {self.init!r}")
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"P: non-positive size in shape {self.shape}")

    def replace(self, **kw) -> "P":
        return dataclasses.replace(self, **kw)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def is_decl(x: Any) -> bool:
    return isinstance(x, P)


def key_for(seed: int, path: str) -> int:
    """A 63-bit generator seed derived from ``(seed, path)`` (stable across runs and machines)."""
    digest = hashlib.sha256(f"{int(seed)}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def draw(decl: P, path: str, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Materialise one full-size leaf on CPU (fp32 draw, then cast), keyed by ``decl.key or path``."""
    path = decl.key or path
    if decl.init == "zeros":
        return torch.zeros(decl.shape, dtype=dtype)
    if decl.init == "ones":
        return torch.ones(decl.shape, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(key_for(seed, path))
    if callable(decl.init):
        return decl.init(decl.shape, gen).to(dtype)
    if decl.init == "normal":
        return torch.empty(decl.shape, dtype=torch.float32).normal_(0.0, decl.std, generator=gen).to(dtype)
    # kaiming_uniform(a=sqrt(5)) as nn.Linear / PEFT initialise LoRA A: bound = 1/sqrt(fan_in).
    bound = 1.0 / math.sqrt(decl.shape[-1])
    return torch.empty(decl.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen).to(dtype)


def init(model, seed: int = 0, *, dtype: torch.dtype | None = None, device: Any = None,
         shard: Callable[[str, P, torch.Tensor], Any] | None = None) -> Any:
    """Materialise every declaration of ``model.defs``.

    Args:
      model: a ``Model`` (or anything with ``.defs`` and ``.config.dtype``), or a defs tree.
      seed: the run seed; each leaf uses ``key_for(seed, path)``.
      dtype: parameter dtype (default: the model config's dtype, else float32).
      device: target device.
      shard: optional ``(path, decl, full_tensor) -> leaf`` hook that keeps only the local shard
        (or wraps it); default the model's ``layout`` (a
        :class:`~pmodel.parallel.layout.Layout` is such a hook). The full draw keeps values
        sharding-independent. Pass it when ``model`` is a defs tree (a pipeline stage's).

    Returns:
      the params pytree, leaves ``requires_grad`` per ``trainable``.
    """
    defs = getattr(model, "defs", model)
    default = dtype or getattr(getattr(model, "config", None), "dtype", None) or torch.float32
    hook = shard if shard is not None else getattr(model, "layout", None)

    def make(path: str, decl: P):
        t = draw(decl, path, seed, decl.dtype or default)
        leaf = hook(path, decl, t) if hook is not None else t
        return tree.map(lambda x: _finish(x, decl, device), leaf)

    return tree.map_with_path(make, defs, is_leaf=is_decl)


def _finish(t: torch.Tensor, decl: P, device) -> torch.Tensor:
    if device is not None:
        t = t.to(device)
    t = t.detach().contiguous()
    t.requires_grad_(decl.trainable and t.is_floating_point())
    return t


def abstract(model, *, dtype: torch.dtype | None = None) -> Any:
    """Meta tensors with every declaration's shape and dtype (allocates nothing)."""
    defs = getattr(model, "defs", model)
    default = dtype or getattr(getattr(model, "config", None), "dtype", None) or torch.float32
    return tree.map(lambda d: torch.empty(d.shape, dtype=d.dtype or default, device="meta"),
                    defs, is_leaf=is_decl)


def count(defs: Any, *, trainable_only: bool = False) -> int:
    """Number of scalars declared."""
    return sum(d.numel for d in tree.leaves(defs, is_leaf=is_decl)
               if d.trainable or not trainable_only)
