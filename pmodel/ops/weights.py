"""The weight protocol: what a weight wrapper leaf implements so that ops dispatch to it.

:func:`pmodel.ops.linear`, :func:`~pmodel.ops.embedding` and
:func:`~pmodel.ops.linear_cross_entropy` take either a plain tensor or a *wrapper leaf*: an
object that stands for a weight and computes the op itself. LoRA (a low-rank adapter around a
frozen base), the tensor-parallel roles (column / row / vocab parallel, which own their
communication) and later expert-parallel or quantized weights are wrappers. They compose by
nesting (``RowParallel(LoRA(base, a, b))``) and never import one another: each one only calls
``ops`` on what it holds, so the inner object's type decides the next step.

A wrapper implements (see :class:`Weight`):

* ``linear(x, bias=None, *, kernels=None, in_shard=None)``: ``x Wᵀ + bias`` for
  ``x`` ``(..., in)`` -> ``(..., out)``. ``in_shard=(start, full_width)`` says that ``x`` holds
  only the input columns ``[start, start + x.shape[-1])`` of a full input of width
  ``full_width`` (a row-parallel rank's columns) and the wrapper holds the matching columns of
  the weight. A wrapper whose result depends on the *full* input must honour it; LoRA draws its
  dropout mask for the full input and keeps these columns, so every rank's mask equals the
  single-process one. Wrappers that compute column-locally ignore it but pass it on to what
  they hold.
* ``dtype``, ``device``, ``shape``: of the weight it stands for as stored on this rank
  (``shape`` ``[out, in]`` local; a wrapper around factors reports its main tensor's dtype).
* ``map_rows(f)``: the same wrapper with ``f`` applied to every tensor whose first dim is the
  weight's output rows (LoRA: ``base`` and ``b``; not ``a``). It lets an outer wrapper attach
  per-row work (e.g. the column-parallel K/V replica gradient sum) to a wrapper it does not know.
* optionally ``embedding(tokens, *, kernels=None)`` (row lookup, ``(B, T) -> (B, T, D)``) and
  ``linear_cross_entropy(h, labels, weights, *, kernels=None) -> (weighted_sum, per_token)``
  (the loss of ``linear(h, W)`` without necessarily forming the logits). Without
  ``linear_cross_entropy`` ops computes the logits with ``linear`` and takes the cross-entropy;
  without ``embedding`` ops refuses with the wrapper's name.

A wrapper is a registered pytree node (:func:`pmodel.tree.register_node`) whose children are
its tensors, so params trees, optimizers and checkpoints see plain tensor leaves. In a model's
*declarations* the same class holds :class:`~pmodel.params.P` leaves (a composite declaration,
e.g. ``LoRA(P, P, P)``); sharding transforms find such composites with :func:`is_wrapper` and
treat their children like any declaration.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

__all__ = ["Weight", "WeightWrapper", "is_wrapper", "map_rows"]


@runtime_checkable
class Weight(Protocol):
    """The protocol a weight wrapper leaf implements (``embedding`` and ``linear_cross_entropy``
    are optional and not part of the runtime check)."""

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, kernels=None,
               in_shard: tuple[int, int] | None = None) -> torch.Tensor: ...

    def map_rows(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "Weight": ...


class WeightWrapper:
    """Optional base class of weight wrappers: marks a class as a wrapper for :func:`is_wrapper`
    (how sharding transforms recognise composite declarations without knowing their type).

    Subclasses implement ``linear``, ``map_rows`` and ``shape``; ``dtype`` and ``device`` default
    to those of :meth:`main_tensor` (the first child, unless overridden).
    """

    __slots__ = ()

    def main_tensor(self) -> Any:
        """The tensor (or inner wrapper) whose dtype and device the wrapper reports."""
        raise NotImplementedError(f"{type(self).__name__} must implement main_tensor() or dtype/device")

    @property
    def dtype(self) -> torch.dtype:
        return self.main_tensor().dtype

    @property
    def device(self) -> torch.device:
        return self.main_tensor().device

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, *, kernels=None,
               in_shard: tuple[int, int] | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement linear")

    def map_rows(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "WeightWrapper":
        raise NotImplementedError(f"{type(self).__name__} does not implement map_rows")


def is_wrapper(x: Any) -> bool:
    """True for a weight wrapper (an instance of :class:`WeightWrapper`)."""
    return isinstance(x, WeightWrapper)


def map_rows(w: Any, f: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``f(w)`` for a tensor, ``w.map_rows(f)`` for a wrapper (see :class:`Weight`)."""
    return f(w) if isinstance(w, torch.Tensor) else w.map_rows(f)
