"""The one training-checkpoint format: sharded, reshardable, atomic.

Every rank writes the pieces it holds; every piece records the **global path** of the parameter
it belongs to, the parameter's **global shape**, the **slice** of the global tensor the rank's
local tensor is (tensor parallel cuts one dimension; a pipeline stage holds whole leaves by their
global path), and, for the distributed optimizer's flat shards, the **flat range** of that local
tensor. Loading under any other layout (another TP / PP / DP split, the replica optimizer, one
process) assembles each leaf it needs from the pieces that overlap its own slice, so params and
optimizer state (fp32 main weights, Adam moments, ZeRO-1 shards) are resharded exactly.

Layout of a checkpoint root::

    root/
      latest                    text: the newest complete checkpoint's folder name
      iter_0000010/
        manifest.json           format, step, world size, mesh sizes, model config, data position,
                                non-tensor state, extra metadata, the sha256 of every file
                                ("files"; verified on load, ``verify=False`` skips it) (written last)
        rank_00000.safetensors  this rank's pieces ("params/<path>", "state/<path>", "rng/...")
        rank_00000.json         the index of those pieces + this rank's python / numpy RNG state

Optimizer-state leaves are matched to parameters by path: a state leaf at ``<key>.<param
path>`` (``inner.inner.0.mu.layers.3.mlp.up_proj.weight``) is a piece of that parameter stored
under ``key``; a leaf that mirrors no parameter (step counters, the loss scale) is global and
written once. A state key absent from the checkpoint is an error naming it, except fp32 main
weights (``...main``), which are the parameters' own values when the checkpoint kept none
(fp32 training without the distributed optimizer).

Saving is atomic as in :mod:`pmodel.checkpoint.state`: ranks write into a hidden temp folder;
after a barrier rank 0 writes the manifest, fsyncs, renames the folder into place and only then
moves ``latest``. Both :func:`save` and :func:`load` are collective over the mesh's ranks.

RNG states are restored only when the checkpoint was written by the same world size and mesh
(the same rank means the same role); after a layout change the run keeps its own seeds, and the
returned manifest says so (``"rng_restored": False``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from .. import tree
from .state import (LATEST, CheckpointError, _fsync_path, _write_safetensors, capture_rng, config_diff, inside,
                    latest, restore_rng, sha256_file)

__all__ = ["FORMAT", "LeafSpec", "Writer", "save", "load", "latest", "CheckpointError", "FullCheckpoint", "read_full",
           "write_full"]

FORMAT = "pmodel-sharded-checkpoint"
VERSION = 1


class LeafSpec(tuple):
    """``(name, global_shape, slices, primary)`` of one local leaf.

    ``name``: the leaf's global path in the single-process model (``layers.5.attn.q_proj.weight``;
    a local params path may carry wrapper child names such as ``.shard``); ``slices``: one
    ``(start, stop)`` per dimension of the global tensor; ``primary``: whether this rank writes
    the piece (exactly one of the ranks holding identical copies does).
    """

    def __new__(cls, name: str, global_shape, slices, primary: bool = True):
        return super().__new__(cls, (str(name), tuple(int(s) for s in global_shape),
                                     tuple((int(a), int(b)) for a, b in slices), bool(primary)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Writer:
    """Who writes what in a save that does not run over the whole process group (a failure
    checkpoint written by the surviving ranks, :mod:`pmodel.resilience`).

    Attributes:
      barrier: synchronises the writing ranks (e.g. over a key-value store; the process group may
        be broken).
      lead: this rank creates the temp folder and commits (manifest, rename, ``latest``).
      params: this rank writes its params and its non-sharded optimizer state (the role of dp
        rank 0 in a regular save).
      shards: this rank writes its distributed-optimizer shards (flat pieces).
    """

    barrier: Callable[[], None]
    lead: bool
    params: bool
    shards: bool = True


def full_specs(params) -> dict[str, LeafSpec]:
    """Specs of an unsharded params tree (one process): every leaf whole, named by its path."""
    return {p: LeafSpec(p, t.shape, [(0, n) for n in t.shape]) for p, t in tree.paths(params)
            if isinstance(t, torch.Tensor)}


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def _match(path: str, params_paths: list[str]) -> str | None:
    """The parameter path that ``path`` (an optimizer-state leaf) ends with, or None."""
    best = None
    for p in params_paths:
        if path.endswith("." + p) and (best is None or len(p) > len(best)):
            best = p
    return best


def _state_entries(opt_state, params_paths: list[str]):
    """Yield ``(state_path, param_path or None, key, leaf)`` for every state leaf."""
    for q, leaf in tree.paths(opt_state, is_leaf=lambda x: x is None):
        if leaf is None:
            continue
        p = _match(q, params_paths)
        key = q[: -len(p) - 1] if p is not None else q
        yield q, p, key, leaf


def save(root, step: int, *, params, opt_state=None, specs: dict[str, LeafSpec] | None = None,
         piece_of: Callable[[str, torch.Tensor], tuple | None] | None = None, rank: int = 0, world: int = 1,
         mesh_sizes: dict | None = None, dp_rank: int = 0, config: dict | None = None, data: dict | None = None,
         extra: dict | None = None, keep_last: int | None = None,
         on_file_written: Callable[[Path], None] | None = None, writer: Writer | None = None) -> Path:
    """Write this rank's pieces of a checkpoint (collective when ``world > 1``).

    Args:
      root: checkpoint root.
      step: the iteration after which this is saved.
      params, opt_state: this rank's params and optimizer state.
      specs: ``{param path: LeafSpec}`` for this rank's params (default: everything whole).
      piece_of: ``(param_path, state_leaf) -> (lo, hi) or None``: the flat range of the local
        parameter a state leaf holds (the distributed optimizer's shards), None = all of it.
      rank, world: global rank and world size; ``dp_rank``: data-parallel coordinate (params and
        non-sharded state are identical over dp: only dp rank 0 writes them).
      mesh_sizes: ``{dim: size}`` (recorded; RNG states are restored only under the same mesh).
      config, data, extra: model config dict, data position, free-form JSON metadata.
      keep_last: keep only this many ``iter_*`` checkpoints (None keeps all).
      on_file_written: called with each file's path once it is written and fsynced (progress
        reporting; tests use it to interrupt a save halfway).
      writer: a :class:`Writer` for a save among a subset of the ranks (default: every rank of
        ``world``, synchronised by the process group; rank 0 commits, dp rank 0 writes params).

    Returns:
      the final checkpoint folder.
    """
    specs = specs if specs is not None else full_specs(params)
    piece_of = piece_of or (lambda p, t: None)
    if writer is None:
        writer = Writer(barrier=lambda: _barrier(world), lead=rank == 0, params=dp_rank == 0)
    lead = writer.lead
    root = Path(root)
    folder = f"iter_{int(step):07d}"
    tmp = root / f".tmp-{folder}"
    if lead:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    writer.barrier()
    tensors: dict[str, torch.Tensor] = {}
    index: list[dict] = []
    scalars: dict[str, Any] = {}
    paths = [p for p, t in tree.paths(params) if isinstance(t, torch.Tensor)]
    leaves = dict(tree.paths(params))
    for p in paths:
        name, shape, box, primary = specs[p]
        if not (primary and writer.params):
            continue
        tensors[f"params/{p}"] = leaves[p].detach()
        index.append({"name": f"params/{p}", "kind": "params", "param": name, "shape": list(shape),
                      "slice": [list(s) for s in box], "flat": None})
    if opt_state is not None:
        for q, p, key, leaf in _state_entries(opt_state, paths):
            if not isinstance(leaf, torch.Tensor):
                if lead:
                    if not isinstance(leaf, (bool, int, float, str)):
                        raise TypeError(f"checkpoint: optimizer-state leaf {q!r} is a {type(leaf).__name__}")
                    scalars[q] = leaf
                continue
            if p is None:  # a global leaf: identical on every rank
                if lead:
                    tensors[f"state/{q}"] = leaf.detach()
                    index.append({"name": f"state/{q}", "kind": "global", "key": q})
                continue
            (name, shape, box, primary), flat = specs[p], piece_of(p, leaf)
            if not primary or (flat is None and not writer.params) or (flat is not None and not writer.shards):
                continue  # another rank writes the same piece
            tensors[f"state/{q}"] = leaf.detach()
            index.append({"name": f"state/{q}", "kind": "state", "key": key, "param": name, "shape": list(shape),
                          "slice": [list(s) for s in box], "flat": list(flat) if flat is not None else None})
    device = next((t.device for t in leaves.values() if isinstance(t, torch.Tensor)), None)
    rng_t, rng_meta = capture_rng(device)
    tensors.update({f"rng/{k}": v for k, v in rng_t.items()})
    tensors = {k: (v.to("cpu") if v.device.type != "cpu" else v).contiguous() for k, v in tensors.items()}
    stem = tmp / f"rank_{rank:05d}"
    _write_safetensors(stem.with_suffix(".safetensors"), tensors)
    if on_file_written is not None:
        on_file_written(stem.with_suffix(".safetensors"))
    (stem.with_suffix(".json")).write_text(json.dumps({"rank": rank, "pieces": index, "rng": rng_meta,
                                                       "sha256": sha256_file(stem.with_suffix(".safetensors"))}))
    _fsync_path(stem.with_suffix(".json"))
    if on_file_written is not None:
        on_file_written(stem.with_suffix(".json"))
    writer.barrier()
    final = root / folder
    if lead:
        _commit(root, tmp, folder, {"step": int(step), "world_size": int(world), "mesh": mesh_sizes or {},
                                    "config": config, "data": data or {}, "scalars": scalars, "extra": extra or {},
                                    "ranks": world}, keep_last)
    writer.barrier()
    return final


def _commit(root: Path, tmp: Path, folder: str, manifest: dict, keep_last: int | None) -> Path:
    """Write the manifest into ``tmp``, rename it to ``root/folder`` and move ``latest`` (the
    atomic end of every save: a crash before the rename leaves the previous checkpoint)."""
    final = root / folder
    files = {}  # every file's sha256: the rank indexes' own, and the data files' from their index
    for f in sorted(tmp.glob("rank_*.json")):
        files[f.name] = sha256_file(f)
        sha = json.loads(f.read_text()).get("sha256")
        if sha:
            files[f.with_suffix(".safetensors").name] = sha
    man = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
    (tmp / "manifest.json").write_text(json.dumps(man, indent=1, sort_keys=True, default=str))
    _fsync_path(tmp / "manifest.json")
    _fsync_path(tmp)
    old = None
    if final.exists():  # re-saving a step: move the old one aside, drop it once the new one is in place
        old = root / f".tmp-old-{folder}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(root)
    lt = root / ".tmp-latest"
    lt.write_text(folder + "\n")
    _fsync_path(lt)
    os.replace(lt, root / LATEST)  # the pointer moves last
    _fsync_path(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        done = sorted(d for d in root.glob("iter_*") if d.is_dir())
        for d in done[:-keep_last]:
            if d != final:
                shutil.rmtree(d, ignore_errors=True)
    return final


class _Source:
    """The pieces of a checkpoint, by what they belong to, with lazily opened files."""

    def __init__(self, d: Path, checksums: dict | None = None):
        """``checksums``: the manifest's ``{file name: sha256}`` to verify each file against before
        it is read (None: no verification, or a checkpoint written before checksums existed)."""
        self.d = d
        self.by: dict[tuple, list] = {}
        self.rank_meta: dict[int, dict] = {}
        self._handles: dict[Path, Any] = {}
        self._sums = checksums
        files = sorted(d.glob("rank_*.json"))
        if not files:
            raise CheckpointError(f"{d}: no rank_*.json piece indexes (not a {FORMAT} checkpoint?)")
        for f in files:
            self._verify(f)
            try:
                meta = json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f}: not a readable piece index ({e})") from None
            st = f.with_suffix(".safetensors")
            try:
                self.rank_meta[int(meta["rank"])] = {"file": st, "rng": meta.get("rng", {})}
                for e in meta["pieces"]:
                    e = dict(e, file=st)
                    if e["kind"] == "params":
                        k = ("params", e["param"])
                    elif e["kind"] == "state":
                        k = ("state", e["key"], e["param"])
                    else:
                        k = ("global", e["key"])
                    self.by.setdefault(k, []).append(e)
            except KeyError as ex:
                raise CheckpointError(f"{f}: missing key {ex.args[0]!r} (a damaged piece index)") from None
            except (TypeError, ValueError) as ex:
                raise CheckpointError(f"{f}: malformed piece index ({ex})") from None

    def _verify(self, f: Path) -> None:
        if self._sums is None:
            return
        want = self._sums.get(f.name)
        if want is None:
            raise CheckpointError(f"{f}: not listed in {self.d / 'manifest.json'}'s checksums (a stray or "
                                  "replaced file?)")
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the manifest lists it)")
        got = sha256_file(f)
        if got != want:
            raise CheckpointError(f"{f}: corrupted: its sha256 is {got[:16]}..., the manifest records "
                                  f"{want[:16]}... (load with checksum verification off to read it anyway)")

    def tensor(self, e: dict) -> torch.Tensor:
        f = e["file"]
        if f not in self._handles:
            self._verify(f)
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as ex:  # noqa: BLE001 - safetensors raises its own types
                raise CheckpointError(f"{f}: cannot be read as safetensors ({ex}; a truncated file?)") from None
        try:
            return self._handles[f].get_tensor(e["name"])
        except Exception as ex:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot read tensor {e['name']!r} ({ex}; a truncated file?)") from None

    def assemble(self, key: tuple, shape: tuple, box: tuple, what: str) -> torch.Tensor:
        """The global tensor for ``key`` with at least ``box`` (target slices) filled."""
        entries = self.by.get(key)
        if not entries:
            raise CheckpointError(f"{self.d}: no pieces for {what}")
        if list(entries[0]["shape"]) != list(shape):
            raise CheckpointError(f"{self.d}: {what} has global shape {entries[0]['shape']} in the checkpoint, "
                                  f"the model expects {list(shape)}")
        full, covered = None, torch.zeros(shape, dtype=torch.bool)
        for e in entries:
            sl = tuple(slice(a, b) for a, b in e["slice"])
            if any(a >= tb or b <= ta for (a, b), (ta, tb) in zip(e["slice"], box)):
                continue  # no overlap with what this rank needs
            t = self.tensor(e)
            if full is None:
                full = torch.zeros(shape, dtype=t.dtype)
            if e["flat"] is None:
                full[sl] = t.view(full[sl].shape)
                covered[sl] = True
            else:
                lo, hi = e["flat"]
                sub, cov = full[sl].reshape(-1).clone(), covered[sl].reshape(-1).clone()
                sub[lo:hi] = t.reshape(-1)
                cov[lo:hi] = True
                full[sl] = sub.view(full[sl].shape)
                covered[sl] = cov.view(covered[sl].shape)
        tsl = tuple(slice(a, b) for a, b in box)
        if full is None or not bool(covered[tsl].all()):
            raise CheckpointError(f"{self.d}: the pieces of {what} do not cover the slice {list(box)} this rank "
                                  "needs (a rank's files are missing?)")
        return full


def load(root, *, params, opt_state=None, specs: dict[str, LeafSpec] | None = None,
         piece_of: Callable[[str, torch.Tensor], tuple | None] | None = None, rank: int = 0, world: int = 1,
         mesh_sizes: dict | None = None, config: dict | None = None, path: str | os.PathLike | None = None,
         restore_rng_state: bool = True, cast_dtype: bool = False, verify: bool = True):
    """Fill ``params`` / ``opt_state`` (templates: this rank's freshly built tensors) in place from
    the latest checkpoint under ``root`` (or the folder ``path``), under any layout.

    Args: as :func:`save` (``specs`` / ``piece_of`` describe *this* run's layout); ``path`` loads
    that checkpoint folder instead of the latest; ``restore_rng_state=False`` leaves the RNGs
    alone (e.g. to evaluate a checkpoint mid-run); ``cast_dtype=True`` accepts a checkpoint whose
    config differs from ``config`` only in ``dtype`` (parameters are cast on load, as Megatron
    loads an fp16 checkpoint into a bf16 run; fp32 optimizer state is unaffected); ``verify=False``
    skips checking each file this rank reads against the sha256 the manifest records.

    Returns:
      ``(params, opt_state, manifest)`` (the manifest gains ``"dir"``, ``"rng_restored"``,
      ``"same_layout"`` (same world size and mesh) and ``"cast_from"`` (the checkpoint's dtype
      when it was cast, else None)), or None when ``root`` holds no checkpoint.

    Raises:
      CheckpointError: naming the file and the leaf or key, for another model config, missing
        pieces or state keys, or shape mismatches.
    """
    d = Path(path) if path is not None else latest(root)
    if d is None:
        return None
    mf = d / "manifest.json"
    if not mf.is_file():
        raise CheckpointError(f"{d}: no manifest.json (an interrupted save, or not a {FORMAT} checkpoint)")
    man = _read_manifest(mf)
    diff = config_diff(man.get("config"), config)
    cast_from = None
    if cast_dtype and diff and all(x.startswith("dtype:") for x in diff):
        cast_from, diff = man["config"]["dtype"], []
    if diff:
        raise CheckpointError(f"{mf} was saved for another model config; differing fields: " + "; ".join(diff))
    specs = specs if specs is not None else full_specs(params)
    piece_of = piece_of or (lambda p, t: None)
    src = _Source(d, _checksums(man, mf) if verify else None)
    leaves = dict(tree.paths(params))
    paths = [p for p, t in leaves.items() if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        for p in paths:
            name, shape, box, _ = specs[p]
            full = src.assemble(("params", name), shape, box, f"parameter {name!r}")
            t = leaves[p]
            t.copy_(full[tuple(slice(a, b) for a, b in box)].reshape(t.shape).to(t.dtype))
        if opt_state is not None:
            state_leaves = []
            for q, p, key, leaf in _state_entries(opt_state, paths):
                if not isinstance(leaf, torch.Tensor):
                    if q not in man.get("scalars", {}):
                        raise CheckpointError(f"{mf}: no optimizer-state value {q!r}")
                    state_leaves.append((q, man["scalars"][q]))
                    continue
                if p is None:
                    ent = src.by.get(("global", q))
                    if not ent:
                        raise CheckpointError(f"{d}: no optimizer-state tensor {q!r} (saved with another optimizer? "
                                              f"keys there: {_keys(src)})")
                    val = src.tensor(ent[0])
                    if tuple(val.shape) != tuple(leaf.shape):
                        raise CheckpointError(f"{d}: optimizer-state {q!r} has shape {list(val.shape)}, "
                                              f"expected {list(leaf.shape)}")
                    leaf.copy_(val.to(leaf.dtype))
                    state_leaves.append((q, leaf))
                    continue
                name, shape, box, _ = specs[p]
                k = ("state", key, name)
                if k not in src.by and key.split(".")[-1] == "main":
                    k = ("params", name)  # fp32 training kept no main copy: the params are it
                if k not in src.by:
                    raise CheckpointError(f"{d}: no optimizer state {key!r} for {name!r} (saved with another "
                                          f"optimizer layout? state keys there: {_keys(src)})")
                full = src.assemble(k, shape, box, f"optimizer state {key!r} of {name!r}")
                local = full[tuple(slice(a, b) for a, b in box)].reshape(-1)
                flat = piece_of(p, leaf)
                if flat is not None:
                    local = local[flat[0]:flat[1]]
                if local.numel() != leaf.numel():
                    raise CheckpointError(f"{d}: optimizer state {key!r} of {name!r}: {local.numel()} values for a "
                                          f"leaf of {leaf.numel()}")
                leaf.copy_(local.view(leaf.shape).to(leaf.dtype))
                state_leaves.append((q, leaf))
            if any(not isinstance(v, torch.Tensor) for _, v in state_leaves):
                filled = dict(state_leaves)
                opt_state = tree.map_with_path(lambda q, x: filled.get(q, x), opt_state,
                                               is_leaf=lambda x: x is None)
    same = man.get("world_size") == world and (man.get("mesh") or {}) == (mesh_sizes or {})
    restored = False
    if restore_rng_state and same and rank in src.rank_meta:
        f = src.rank_meta[rank]["file"]
        if f not in src._handles:
            src._verify(f)
        with safe_open(str(f), framework="pt") as h:
            rng_t = {k[len("rng/"):]: h.get_tensor(k) for k in h.keys() if k.startswith("rng/")}
        # A converted checkpoint (write_full) carries no RNG state: nothing to restore.
        if rng_t:
            device = next((t.device for t in leaves.values() if isinstance(t, torch.Tensor)), None)
            restore_rng(rng_t, src.rank_meta[rank]["rng"], device)
            restored = True
    man = dict(man, dir=str(d), rng_restored=restored, same_layout=same, cast_from=cast_from)
    return params, opt_state, man


_MANIFEST_KEYS = ("format", "step", "world_size", "mesh", "config", "data", "scalars", "extra")


def _read_manifest(mf: Path) -> dict:
    """The manifest, refused (naming the file and the key) when unreadable or incomplete."""
    try:
        man = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mf}: not a readable manifest ({e})") from None
    if not isinstance(man, dict):
        raise CheckpointError(f"{mf}: expected a JSON object")
    if man.get("format") != FORMAT:
        raise CheckpointError(f"{mf} is a {man.get('format')!r} checkpoint, not {FORMAT!r}")
    missing = [k for k in _MANIFEST_KEYS if k not in man]
    if missing:
        raise CheckpointError(f"{mf}: missing key(s) {missing} (a damaged or hand-edited manifest)")
    return man


def _checksums(man: dict, mf: Path) -> dict | None:
    """The manifest's ``{file name: sha256}`` (None for a checkpoint written before checksums),
    each name refused if it is not a plain file name of the checkpoint folder."""
    files = man.get("files")
    if files is None:
        return None
    if not isinstance(files, dict):
        raise CheckpointError(f"{mf}: 'files' must be an object of file name -> sha256")
    for name in files:
        inside(mf.parent, name, str(mf))
    return files


def _keys(src: _Source) -> list[str]:
    return sorted({k[1] for k in src.by if k[0] == "state"})


# ----------------------------------------------------------------------------- offline conversion
@dataclasses.dataclass
class FullCheckpoint:
    """A checkpoint as whole (single-process layout) tensors named by global path: what
    :func:`read_full` assembles and :func:`write_full` cuts into any layout's pieces.

    Attributes:
      params: ``{global param path: full tensor}``.
      state: ``{(state key, global param path): full tensor}`` (Adam moments, fp32 main weights).
      globals: ``{state path: tensor}`` for state leaves that mirror no parameter (step counters).
      scalars: ``{state path: python value}`` (non-tensor optimizer state).
      manifest: the source manifest (``{}`` for one built from other formats).
    """

    params: dict
    state: dict = dataclasses.field(default_factory=dict)
    globals: dict = dataclasses.field(default_factory=dict)
    scalars: dict = dataclasses.field(default_factory=dict)
    manifest: dict = dataclasses.field(default_factory=dict)


def read_full(path, *, state: bool = True, verify: bool = True) -> FullCheckpoint:
    """Assemble every leaf of a checkpoint into whole tensors, whatever layout wrote it.

    Args:
      path: a checkpoint folder (``iter_*``) or a root (its latest checkpoint).
      state: also read the optimizer state (False: params only).
      verify: check every file against the sha256 its manifest records.

    Returns:
      a :class:`FullCheckpoint` (``manifest`` gains ``"dir"``).

    Raises:
      CheckpointError: not a checkpoint of this format, or pieces that do not cover a leaf.
    """
    p = Path(path)
    d = p if (p / "manifest.json").is_file() else latest(p)
    if d is None:
        raise CheckpointError(f"{p}: no {FORMAT} checkpoint here (no manifest.json, no latest)")
    man = _read_manifest(d / "manifest.json")
    src = _Source(d, _checksums(man, d / "manifest.json") if verify else None)
    out = FullCheckpoint(params={}, manifest=dict(man, dir=str(d)), scalars=dict(man.get("scalars", {})))
    for k, entries in sorted(src.by.items()):
        if k[0] == "global":
            if state:
                out.globals[k[1]] = src.tensor(entries[0])
            continue
        if k[0] == "state" and not state:
            continue
        shape = tuple(entries[0]["shape"])
        full = src.assemble(k, shape, tuple((0, n) for n in shape), f"{k[0]} {k[1:]}")
        if k[0] == "params":
            out.params[k[1]] = full
        else:
            out.state[(k[1], k[2])] = full
    if not state:
        out.scalars = {}
    return out


def write_full(root, step: int, ck: FullCheckpoint, rank_specs: list[dict[str, LeafSpec]], *,
               mesh_sizes: dict | None = None, config: dict | None = None, data: dict | None = None,
               extra: dict | None = None, keep_last: int | None = None) -> Path:
    """Write ``ck`` as the checkpoint of a layout's ranks, from one process (no process group).

    Each rank's file holds the pieces that rank would write at run time, so a run under that
    layout reads only its own file (any other layout still loads it: pieces carry global path,
    shape and slice). Optimizer state is cut like its parameter (whole, not ZeRO-1 flat shards,
    which depend on the data-parallel size of the run that loads it). No RNG state is written.

    Args:
      root: checkpoint root; the folder is ``iter_<step>`` and ``latest`` moves to it.
      step: the iteration recorded.
      ck: the whole tensors.
      rank_specs: per global rank, ``{global param path: LeafSpec}`` of the leaves it holds
        (``pmodel.parallel.plan.rank_specs``); every param of ``ck`` must be written by some rank.
      mesh_sizes, config, data, extra: as :func:`save`.

    Returns:
      the checkpoint folder.
    """
    root = Path(root)
    folder = f"iter_{int(step):07d}"
    tmp = root / f".tmp-{folder}"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    by_param: dict[str, list] = {}
    for (key, name), t in ck.state.items():
        by_param.setdefault(name, []).append((key, t))
    written: set[str] = set()
    for rank, specs in enumerate(rank_specs):
        tensors: dict[str, torch.Tensor] = {}
        index: list[dict] = []
        for name, (gname, shape, box, primary) in specs.items():
            if not primary:
                continue
            if gname not in ck.params:
                raise CheckpointError(f"write_full: no tensor for parameter {gname!r}")
            full = ck.params[gname]
            if tuple(full.shape) != tuple(shape):
                raise CheckpointError(f"write_full: {gname!r} has shape {list(full.shape)}, the layout expects "
                                      f"{list(shape)}")
            sl = tuple(slice(a, b) for a, b in box)
            tensors[f"params/{gname}"] = full[sl]
            index.append({"name": f"params/{gname}", "kind": "params", "param": gname, "shape": list(shape),
                          "slice": [list(b) for b in box], "flat": None})
            for key, t in by_param.get(gname, ()):
                tensors[f"state/{key}.{gname}"] = t[sl]
                index.append({"name": f"state/{key}.{gname}", "kind": "state", "key": key, "param": gname,
                              "shape": list(shape), "slice": [list(b) for b in box], "flat": None})
            written.add(gname)
        if rank == 0:
            for q, t in ck.globals.items():
                tensors[f"state/{q}"] = t
                index.append({"name": f"state/{q}", "kind": "global", "key": q})
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        stem = tmp / f"rank_{rank:05d}"
        _write_safetensors(stem.with_suffix(".safetensors"), tensors)
        stem.with_suffix(".json").write_text(json.dumps({"rank": rank, "pieces": index, "rng": {},
                                                         "sha256": sha256_file(stem.with_suffix(".safetensors"))}))
        _fsync_path(stem.with_suffix(".json"))
        del tensors
    missing = sorted(set(ck.params) - written)
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"write_full: the layout holds no piece of {missing[:5]} (another model?)")
    world = len(rank_specs)
    return _commit(root, tmp, folder, {"step": int(step), "world_size": world, "mesh": mesh_sizes or {},
                                       "config": config, "data": data or {}, "scalars": dict(ck.scalars),
                                       "extra": extra or {}, "ranks": world}, keep_last)
