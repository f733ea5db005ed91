"""A family's on-disk tensor layout: how pmodel's parameters become checkpoint tensors and back.

pmodel keeps one parameter per projection (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``,
``up_proj``, ...), each ``[out, in]``. Checkpoints of other families store some of them fused
or transposed. A family describes its layout as data, a tuple of :class:`Map` entries (one per
module), in the spirit of torchtitan's state-dict adapters:

* ``Map("layers.{i}.attn.q_proj", "model.layers.{i}.self_attn.q_proj")``: a rename (``{i}`` is
  the layer index; every leaf under the module keeps its suffix, ``.weight`` / ``.bias``);
* ``Map(("layers.{i}.attn.q_proj", "layers.{i}.attn.k_proj", "layers.{i}.attn.v_proj"),
  "model.layers.{i}.self_attn.W_pack")``: several modules stored as one, their output rows
  concatenated in order (Baichuan ``W_pack``, Qwen ``c_attn``, ChatGLM ``query_key_value`` and
  ``dense_h_to_4h``);
* ``groups="heads"`` (or ``"kv_heads"``, or an int): the output rows interleaved per group:
  for group ``g`` the ``g``-th slice of every part, in order (Bloom's ``query_key_value`` holds
  ``[q_h, k_h, v_h]`` per head);
* ``transpose=True``: the checkpoint stores the weight ``[in, out]`` (GPT-2's ``Conv1D``);
* ``experts=True``: the pmodel leaf stacks experts on dim 0 (``(E, out, in)``) and the checkpoint
  stores one tensor per expert, ``{j}`` in the checkpoint template being the expert index
  (Mixtral's ``block_sparse_moe.experts.{j}.w1``).

Every conversion acts on the **output rows** of a module, so one rule covers its weight, its
bias and a LoRA ``B`` factor (``[out, r]``) alike; a PEFT adapter on a fused module has one
``A`` and a stacked ``B`` (see :mod:`pmodel.checkpoint.peft`). Vocabulary padding
(``ModelConfig.pad_vocab_to``) is the other layout rule: checkpoints store ``vocab_size``
rows of a ``vocab`` leaf; pmodel pads with zero rows on load and cuts them on save.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping

import torch

__all__ = ["Map", "TensorLayout", "join_rows", "split_rows"]


@dataclasses.dataclass(frozen=True)
class Map:
    """One checkpoint module and the pmodel module(s) it holds.

    Attributes:
      ours: pmodel module template(s) (``"layers.{i}.attn.q_proj"``); several = fused, in the
        checkpoint's row order.
      hf: the checkpoint module template (``"transformer.h.{i}.attn.c_attn"``).
      groups: None (parts' rows concatenated), ``"heads"`` / ``"kv_heads"`` (that many groups
        from the config) or an int: rows interleaved per group, every part split in that many
        equal slices.
      transpose: the checkpoint stores the 2-D weight transposed (``[in, out]``).
      experts: one checkpoint tensor per expert (``{j}`` in ``hf``) for a leaf stacked on dim 0.
    """

    ours: tuple[str, ...] | str
    hf: str
    groups: str | int | None = None
    transpose: bool = False
    experts: bool = False

    def __post_init__(self):
        if isinstance(self.ours, str):
            object.__setattr__(self, "ours", (self.ours,))
        if not self.ours:
            raise ValueError(f"Map for {self.hf!r}: no pmodel module given")
        if self.groups is not None and not isinstance(self.groups, int) and self.groups not in ("heads", "kv_heads"):
            raise ValueError(f"Map for {self.hf!r}: groups must be None, 'heads', 'kv_heads' or an int, "
                             f"got {self.groups!r}")
        if self.experts and (len(self.ours) > 1 or self.groups is not None or "{j}" not in self.hf):
            raise ValueError(f"Map for {self.hf!r}: experts=True needs one pmodel module, no groups and '{{j}}' "
                             "(the expert index) in the checkpoint template")

    @property
    def fused(self) -> bool:
        return len(self.ours) > 1 or self.groups is not None

    def num_groups(self, cfg) -> int | None:
        if self.groups is None or isinstance(self.groups, int):
            return self.groups
        return cfg.num_heads if self.groups == "heads" else cfg.num_kv_heads


def join_rows(parts: list[torch.Tensor], groups: int | None = None) -> torch.Tensor:
    """Stack the parts' output rows (dim 0): in order, or interleaved per group."""
    if groups is None:
        return torch.cat(parts, dim=0)
    rest = parts[0].shape[1:]
    for t in parts:
        if t.shape[0] % groups:
            raise ValueError(f"join_rows: {t.shape[0]} rows do not split into {groups} groups")
    return torch.cat([t.reshape(groups, t.shape[0] // groups, *rest) for t in parts], dim=1).reshape(-1, *rest)


def split_rows(t: torch.Tensor, sizes: list[int], groups: int | None = None) -> list[torch.Tensor]:
    """Inverse of :func:`join_rows` for parts of ``sizes`` rows."""
    if groups is None:
        return [x.contiguous() for x in t.split(sizes, dim=0)]
    rest = t.shape[1:]
    g = t.reshape(groups, t.shape[0] // groups, *rest)
    return [x.reshape(s, *rest).contiguous() for x, s in zip(g.split([s // groups for s in sizes], dim=1), sizes)]


def _fmt(template: str, i, j=None) -> str:
    """Fill ``{i}`` (layer) and, when given, ``{j}`` (expert) in a module template."""
    out = template.replace("{i}", str(i)) if i is not None else template
    return out.replace("{j}", str(j)) if j is not None else out


def _template(path: str) -> tuple[str, str | None]:
    """``layers.3.attn.q_proj.weight`` -> (``layers.{i}.attn.q_proj.weight``, ``"3"``)."""
    parts = path.split(".")
    if parts[0] == "layers" and len(parts) > 1:
        return ".".join(["layers", "{i}"] + parts[2:]), parts[1]
    return path, None


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One checkpoint tensor and the pmodel leaves it holds (``paths`` in row order)."""

    key: str
    map: Map
    paths: tuple[str, ...]
    suffix: str  # ".weight", ".bias", ...
    expert: int | None = None  # experts=True: the expert this tensor holds (dim 0 of the leaf)


class TensorLayout:
    """A family's compiled :class:`Map` table (see the module docstring).

    Args:
      family: the family name (error messages).
      maps: the table; tuples ``(ours, hf)`` are read as renames.
    """

    def __init__(self, family: str, maps: Iterable[Map | tuple[str, str]]):
        self.family = family
        self.maps = tuple(m if isinstance(m, Map) else Map(*m) for m in maps)
        self._by_ours: dict[str, tuple[Map, int]] = {}
        for m in self.maps:
            for j, o in enumerate(m.ours):
                if o in self._by_ours:
                    raise ValueError(f"family {family!r}: pmodel module {o!r} is mapped twice")
                self._by_ours[o] = (m, j)

    # ------------------------------------------------------------------ names
    def locate(self, path: str) -> tuple[Map, int, str | None, str]:
        """``(map, part index, layer index, suffix)`` for a pmodel leaf path."""
        templ, idx = _template(path)
        pieces = templ.split(".")
        for n in range(len(pieces), 0, -1):  # longest module prefix first
            hit = self._by_ours.get(".".join(pieces[:n]))
            if hit is not None:
                suffix = "".join("." + p for p in pieces[n:])
                return hit[0], hit[1], idx, suffix
        raise KeyError(f"family {self.family!r} has no checkpoint name for parameter {path!r}")

    def hf_module(self, path: str) -> str:
        """The checkpoint module holding the pmodel module or leaf ``path`` (fused: the fused one)."""
        m, _, idx, suffix = self.locate(path)
        return _fmt(m.hf, idx) + suffix

    def leaves(self, paths: Iterable[str]) -> dict[str, _Leaf]:
        """Checkpoint key -> the pmodel leaves it holds, for every leaf in ``paths``.

        Raises when a fused module's parts are not all among ``paths`` (a checkpoint tensor
        cannot be written from half its rows). ``paths`` must map path -> tensor or declaration
        (anything with ``.shape``) when a per-expert module is among them (its expert count).
        """
        shaped = paths if isinstance(paths, Mapping) else None
        paths = list(paths)
        have = set(paths)
        out: dict[str, _Leaf] = {}
        for p in paths:
            m, _, idx, suffix = self.locate(p)
            if m.experts:
                if shaped is None:
                    raise TypeError(f"family {self.family!r}: {p} is stored per expert; pass path -> tensor/declaration")
                for e in range(shaped[p].shape[0]):
                    key = _fmt(m.hf, idx, e) + suffix
                    out[key] = _Leaf(key=key, map=m, paths=(_fmt(m.ours[0], idx) + suffix,), suffix=suffix, expert=e)
                continue
            key = _fmt(m.hf, idx) + suffix
            if key in out:
                continue
            parts = tuple(o.format(i=idx) + suffix for o in m.ours)
            absent = [q for q in parts if q not in have]
            if absent:
                raise KeyError(f"family {self.family!r}: checkpoint tensor {key!r} fuses {list(parts)}, "
                               f"but {absent} are not parameters of this model")
            out[key] = _Leaf(key=key, map=m, paths=parts, suffix=suffix)
        return out

    # ------------------------------------------------------------------ tensors
    @staticmethod
    def _vocab_rows(cfg, decl) -> int | None:
        """Rows a checkpoint stores for a padded ``vocab`` leaf (None: not padded)."""
        if decl is not None and decl.axes and decl.axes[0] == "vocab" and cfg.padded_vocab_size != cfg.vocab_size:
            return cfg.vocab_size
        return None

    def hf_shape(self, cfg, leaf: _Leaf, decls: Mapping) -> tuple[int, ...]:
        shapes = [tuple(decls[p].shape) for p in leaf.paths]
        if leaf.expert is not None:
            shape = shapes[0][1:]
            return tuple(reversed(shape)) if leaf.map.transpose and len(shape) == 2 else shape
        rows = sum(s[0] for s in shapes)
        if len(leaf.paths) == 1:
            v = self._vocab_rows(cfg, decls[leaf.paths[0]])
            rows = v if v is not None else rows
        shape = (rows, *shapes[0][1:])
        return tuple(reversed(shape)) if leaf.map.transpose and len(shape) == 2 else shape

    def to_hf(self, cfg, flat: Mapping[str, torch.Tensor], decls: Mapping) -> dict[str, torch.Tensor]:
        """Checkpoint key -> tensor for pmodel leaves ``flat`` (path -> tensor) with declarations ``decls``."""
        out = {}
        for key, leaf in self.leaves(flat).items():
            ts = [flat[p] for p in leaf.paths]
            if leaf.expert is not None:
                t = ts[0][leaf.expert]
            elif len(ts) == 1 and leaf.map.groups is None:
                t = ts[0]
                v = self._vocab_rows(cfg, decls.get(leaf.paths[0]))
                if v is not None:
                    t = t[:v]
            else:
                t = join_rows(ts, leaf.map.num_groups(cfg))
            if leaf.map.transpose and t.dim() == 2:
                t = t.t()
            out[key] = t.contiguous()
        return out

    def from_hf(self, cfg, decls: Mapping, read: Callable[[str], torch.Tensor],
                where: str = "checkpoint") -> dict[str, torch.Tensor]:
        """pmodel path -> tensor for every declaration in ``decls``; ``read(key)`` gives a checkpoint tensor.

        Shapes are checked against the declarations; errors name ``where``, the key, the shape
        found and the one expected.
        """
        out = {}
        experts: dict[str, list] = {}
        for key, leaf in self.leaves(decls).items():
            t = read(key)
            want = self.hf_shape(cfg, leaf, decls)
            if tuple(t.shape) != want:
                raise ValueError(f"{where}: tensor {key!r} has shape {tuple(t.shape)}, expected {want} for "
                                 f"{', '.join(leaf.paths)}")
            if leaf.map.transpose and t.dim() == 2:
                t = t.t()
            if leaf.expert is not None:
                experts.setdefault(leaf.paths[0], []).append((leaf.expert, t))
                continue
            if len(leaf.paths) == 1 and leaf.map.groups is None:
                d = decls[leaf.paths[0]]
                if self._vocab_rows(cfg, d) is not None:
                    t = torch.cat([t, t.new_zeros(d.shape[0] - t.shape[0], *t.shape[1:])])
                out[leaf.paths[0]] = t.contiguous()
                continue
            sizes = [decls[p].shape[0] for p in leaf.paths]
            for p, x in zip(leaf.paths, split_rows(t, sizes, leaf.map.num_groups(cfg))):
                out[p] = x
        for p, parts in experts.items():  # per-expert tensors stacked on dim 0
            out[p] = torch.stack([t for _, t in sorted(parts, key=lambda et: et[0])]).contiguous()
        return out

    # ------------------------------------------------------------------ adapters (output rows only)
    def rows_to_hf(self, cfg, module_key: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """Join the parts' row tensors (e.g. LoRA ``B`` factors) as the checkpoint module ``module_key`` stores them."""
        m = self._module_map(module_key)
        return parts[0] if len(parts) == 1 and m.groups is None else join_rows(parts, m.num_groups(cfg))

    def rows_from_hf(self, cfg, module_key: str, t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Inverse of :meth:`rows_to_hf` for parts of ``sizes`` rows."""
        m = self._module_map(module_key)
        if sum(sizes) != t.shape[0]:
            raise ValueError(f"family {self.family!r}: {module_key} has {t.shape[0]} output rows, "
                             f"expected {sum(sizes)} ({sizes})")
        return [t] if len(sizes) == 1 and m.groups is None else split_rows(t, sizes, m.num_groups(cfg))

    def modules(self, module_paths: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Checkpoint module -> the pmodel modules it holds (row order), for pmodel module paths."""
        out: dict[str, tuple[str, ...]] = {}
        for p in module_paths:
            m, _, idx, suffix = self.locate(p)
            if suffix:
                raise KeyError(f"family {self.family!r}: {p!r} is a leaf, not a module")
            out[_fmt(m.hf, idx)] = tuple(o.format(i=idx) for o in m.ours)
        return out

    def _module_map(self, module_key: str) -> Map:
        for m in self.maps:
            templ = m.hf.split(".")
            got = module_key.split(".")
            if len(templ) == len(got) and all(a == b or a == "{i}" and b.isdigit() for a, b in zip(templ, got)):
                return m
        raise KeyError(f"family {self.family!r} has no checkpoint module {module_key!r}")

    def module_parts(self, module_key: str) -> tuple[str, ...]:
        """pmodel modules held by the checkpoint module ``module_key`` (row order)."""
        m = self._module_map(module_key)
        templ, got = m.hf.split("."), module_key.split(".")
        idx = next((b for a, b in zip(templ, got) if a == "{i}"), None)
        return tuple(o.format(i=idx) for o in m.ours)
