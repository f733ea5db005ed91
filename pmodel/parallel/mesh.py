"""The device mesh: named parallel dimensions over torch.distributed process groups.

A :class:`Mesh` lays the ``world_size`` ranks out on five named dimensions in Megatron's rank
order, ``tp`` fastest then ``cp``, ``ep``, ``dp`` and ``pp`` slowest::

    rank = tp + TP * (cp + CP * (ep + EP * (dp + DP * pp)))

so tensor-parallel peers are neighbours (same node, fastest links) and pipeline stages are the
farthest apart. Every dimension is independent here (``world = tp * cp * ep * dp * pp``); Megatron
folds expert parallelism into data parallelism instead, which a caller can express by building
the mesh with ``ep=1`` and reading experts off ``dp``.

Nothing is global: the library never reads the torchrun environment. Scripts read ``RANK`` /
``WORLD_SIZE`` / ``MASTER_ADDR`` and call :func:`init_distributed` (or initialise the default
group themselves) and pass the resulting ``Mesh`` explicitly to every transform.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
from typing import Any

import torch.distributed as dist

__all__ = ["DIMS", "Mesh", "default_backend", "init_distributed"]

# Megatron's order, fastest-varying first.
DIMS: tuple[str, ...] = ("tp", "cp", "ep", "dp", "pp")

_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def default_backend(device_type: str) -> str:
    """The collective backend for a device type: gloo on CPU, nccl on CUDA, hccl on Ascend NPU."""
    if device_type not in _BACKENDS:
        raise ValueError(f"no default torch.distributed backend for device type {device_type!r}; "
                         f"known: {_BACKENDS}")
    return _BACKENDS[device_type]


def init_distributed(*, rank: int, world_size: int, backend: str | None = None, device_type: str = "cpu",
                     init_method: str = "env://", timeout_s: float = 600.0, store: Any = None) -> None:
    """Initialise the default process group from explicit arguments.

    Args:
      rank, world_size: this process's global rank and the number of processes.
      backend: ``"gloo"`` / ``"nccl"`` / ``"hccl"``; default from ``device_type``.
      device_type: ``"cpu"``, ``"cuda"`` or ``"npu"`` (chooses the default backend).
      init_method: e.g. ``"tcp://host:port"``; ``"env://"`` lets torch read MASTER_ADDR/PORT, which
        only a script should rely on.
      timeout_s: collective timeout.
      store: a ``torch.distributed.Store`` to rendezvous over instead of ``init_method`` (e.g. a
        launcher's store under a prefix unique to the launch attempt).
    """
    if dist.is_initialized():
        raise RuntimeError("init_distributed: the default process group is already initialised")
    if not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: rank {rank} outside world of size {world_size}")
    how = {"store": store} if store is not None else {"init_method": init_method}
    dist.init_process_group(backend or default_backend(device_type), rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **how)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Mesh:
    """Ranks laid out on named dimensions, with one process group per dimension.

    Build it with :meth:`Mesh.build` (collective: every rank must call it with the same sizes).

    Attributes:
      sizes: ``{dim: size}`` for every name in :data:`DIMS`.
      global_rank, world_size: this process in the default group.
      coords: ``{dim: coordinate}`` of this rank.
      groups: ``{dim: ProcessGroup or None}``; None for a size-1 dimension (no communication).
      group_ranks: ``{dim: tuple of global ranks}`` of this rank's group along each dimension.
      backend: the collective backend name.
    """

    sizes: dict
    global_rank: int
    world_size: int
    coords: dict
    groups: dict
    group_ranks: dict
    backend: str
    timeout_s: float | None = None

    def __post_init__(self):
        if set(self.sizes) != set(DIMS):
            raise ValueError(f"Mesh.sizes must name exactly {DIMS}, got {sorted(self.sizes)}")
        if math.prod(self.sizes.values()) != self.world_size:
            raise ValueError(f"Mesh: product of sizes {self.sizes} != world size {self.world_size}")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def layout(world_size: int, *, tp: int = 1, pp: int = 1, dp: int | None = None, cp: int = 1,
               ep: int = 1) -> dict:
        """Validated ``{dim: size}``; ``dp`` defaults to whatever is left of the world."""
        given = {"tp": tp, "cp": cp, "ep": ep, "pp": pp}
        for k, v in given.items():
            if int(v) < 1:
                raise ValueError(f"Mesh: {k} size must be >= 1, got {v}")
        other = tp * cp * ep * pp
        if dp is None:
            if world_size % other:
                raise ValueError(f"Mesh: world size {world_size} is not divisible by tp*cp*ep*pp = "
                                 f"{tp}*{cp}*{ep}*{pp} = {other}")
            dp = world_size // other
        if dp < 1 or other * dp != world_size:
            raise ValueError(f"Mesh: tp*cp*ep*dp*pp = {tp}*{cp}*{ep}*{dp}*{pp} must equal world size {world_size}")
        return {"tp": tp, "cp": cp, "ep": ep, "dp": dp, "pp": pp}

    @staticmethod
    def rank_of(sizes: dict, coords: dict) -> int:
        """Global rank at ``coords`` (Megatron order, tp fastest)."""
        r, stride = 0, 1
        for d in DIMS:
            r += coords[d] * stride
            stride *= sizes[d]
        return r

    @staticmethod
    def coords_of(sizes: dict, rank: int) -> dict:
        out = {}
        for d in DIMS:
            out[d] = rank % sizes[d]
            rank //= sizes[d]
        return out

    @classmethod
    def build(cls, *, tp: int = 1, pp: int = 1, dp: int | None = None, cp: int = 1, ep: int = 1,
              group: Any = None, timeout_s: float | None = None) -> "Mesh":
        """Lay the initialised default process group out as a mesh (collective).

        Args:
          tp, pp, cp, ep: sizes of those dimensions.
          dp: data-parallel size; default ``world // (tp * cp * ep * pp)``.
          group: must be None (the default group); sub-meshes are not supported yet.
          timeout_s: collective timeout of the mesh's groups (None: torch's default for new
            groups, 30 minutes on gloo, *not* the default group's). A peer that stops answering
            makes a collective fail after this long (how a high-availability run detects it).

        Returns:
          the :class:`Mesh`, holding one new process group per dimension of size > 1.
        """
        if group is not None:
            raise NotImplementedError("Mesh.build over a non-default group is not supported; "
                                      "initialise the default group with the ranks you want")
        if not dist.is_initialized():
            raise RuntimeError("Mesh.build needs an initialised default process group "
                               "(call pmodel.parallel.init_distributed or torch.distributed.init_process_group)")
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = cls.layout(world, tp=tp, pp=pp, dp=dp, cp=cp, ep=ep)
        coords = cls.coords_of(sizes, rank)
        groups, group_ranks = {}, {}
        for d in DIMS:
            mine, pg = _groups_along(sizes, [d], coords, timeout_s)
            groups[d], group_ranks[d] = pg, mine
        return cls(sizes=sizes, global_rank=rank, world_size=world, coords=coords, groups=groups,
                   group_ranks=group_ranks, backend=str(dist.get_backend()), timeout_s=timeout_s)

    @classmethod
    def single(cls) -> "Mesh":
        """A one-rank mesh that needs no process group (every dimension has size 1)."""
        sizes = {d: 1 for d in DIMS}
        return cls(sizes=sizes, global_rank=0, world_size=1, coords={d: 0 for d in DIMS},
                   groups={d: None for d in DIMS}, group_ranks={d: (0,) for d in DIMS}, backend="none")

    # ------------------------------------------------------------------ queries
    def size(self, dim: str) -> int:
        """Number of ranks along ``dim``."""
        self._check(dim)
        return self.sizes[dim]

    def rank(self, dim: str) -> int:
        """This rank's coordinate along ``dim``."""
        self._check(dim)
        return self.coords[dim]

    def group(self, dim: str):
        """The process group along ``dim`` (None when its size is 1: nothing to communicate)."""
        self._check(dim)
        return self.groups[dim]

    def ranks(self, dim: str) -> tuple[int, ...]:
        """Global ranks of this rank's group along ``dim``, in coordinate order."""
        self._check(dim)
        return self.group_ranks[dim]

    def new_group(self, dims: tuple[str, ...] | list[str]):
        """A process group spanning several dimensions (collective: every rank must call it).

        Returns ``(global_ranks, group)``; group is None when it holds one rank.
        """
        for d in dims:
            self._check(d)
        return _groups_along(self.sizes, list(dims), self.coords, self.timeout_s)

    def split(self, dim: str, parts: int):
        """Split ``dim`` into ``parts`` contiguous blocks and make a group per block (collective).

        Used by the replica optimizer: the dp ranks ``[0, dp/2)`` and ``[dp/2, dp)`` form two
        replica groups, each holding every optimizer shard once.

        Returns:
          ``(block_index, index_in_block, global_ranks, group)`` for this rank.
        """
        self._check(dim)
        n = self.sizes[dim]
        if parts < 1 or n % parts:
            raise ValueError(f"Mesh.split: {dim} size {n} is not divisible into {parts} parts")
        per = n // parts
        others = [d for d in DIMS if d != dim]
        mine_ranks, mine_group = None, None
        for combo in itertools.product(*(range(self.sizes[d]) for d in others)):
            base = dict(zip(others, combo))
            for b in range(parts):
                ranks = tuple(self.rank_of(self.sizes, {**base, dim: b * per + i}) for i in range(per))
                pg = dist.new_group(list(ranks), timeout=_td(self.timeout_s)) if per > 1 else None
                if self.global_rank in ranks:
                    mine_ranks, mine_group = ranks, pg
        c = self.coords[dim]
        return c // per, c % per, mine_ranks, mine_group

    def _check(self, dim: str) -> None:
        if dim not in self.sizes:
            raise KeyError(f"Mesh has no dimension {dim!r}; dimensions are {DIMS}")

    def __repr__(self) -> str:
        s = " ".join(f"{d}={self.sizes[d]}" for d in DIMS if self.sizes[d] > 1) or "single"
        return f"Mesh({s}; rank {self.global_rank}/{self.world_size} at {self.coords})"


def _td(timeout_s: float | None):
    return None if timeout_s is None else datetime.timedelta(seconds=timeout_s)


def _groups_along(sizes: dict, dims: list[str], coords: dict, timeout_s: float | None = None):
    """Create (collectively) every group that varies ``dims`` with the other coordinates fixed;
    return this rank's ``(ranks, group)``."""
    others = [d for d in DIMS if d not in dims]
    n = math.prod(sizes[d] for d in dims)
    mine_ranks, mine_group = None, None
    for combo in itertools.product(*(range(sizes[d]) for d in others)):
        base = dict(zip(others, combo))
        ranks = []
        # Coordinate order along the spanned dims, first dim fastest (keeps Megatron's order).
        for inner in itertools.product(*(range(sizes[d]) for d in reversed(dims))):
            c = dict(zip(reversed(dims), inner))
            ranks.append(Mesh.rank_of(sizes, {**base, **c}))
        ranks = tuple(ranks)
        pg = dist.new_group(list(ranks), timeout=_td(timeout_s)) if n > 1 else None
        if all(base[d] == coords[d] for d in others):
            mine_ranks, mine_group = ranks, pg
    return mine_ranks, mine_group
