"""Layout as data and the weight protocol.

Pure unit tests run on fake meshes (the ``Mesh`` dataclass built by hand, no process group: the
collectives are identities), looping over every rank's coordinates: placements (local slice,
role, gradient reductions, norm weight, primary copy) for TP, for LoRA children, for a pipeline
stage's subset of declarations, and for a toy expert rule (``experts -> ep``) composed with TP on
a tp=2 x ep=2 mesh. One gloo launch (2 ranks) runs a toy weight wrapper that tensor.py does not
know under column and row parallelism, with and without sequence parallel, against one process.
"""
from __future__ import annotations

import math

import pytest
import torch

import pmodel
from pmodel import lora as L
from pmodel import ops, tree
from pmodel.model import ModelConfig, build
from pmodel.ops.weights import WeightWrapper, map_rows
from pmodel.params import P, is_decl
from pmodel.parallel import ColumnParallel, Layout, RowParallel, Wrapping, tensor_parallel
from pmodel.parallel.layout import TP_RULES
from pmodel.parallel.mesh import DIMS, Mesh

from _dist import assert_all_ok, launch


def fake_mesh(rank: int, **sizes) -> Mesh:
    """Rank ``rank`` of a mesh with the given sizes; no process group (every group is None)."""
    s = {d: int(sizes.get(d, 1)) for d in DIMS}
    return Mesh(sizes=s, global_rank=rank, world_size=math.prod(s.values()), coords=Mesh.coords_of(s, rank),
                groups={d: None for d in DIMS}, group_ranks={d: (rank,) for d in DIMS}, backend="none")


def gqa(**kw):
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                qkv_bias=True, o_bias=True)
    base.update(kw)
    return ModelConfig(**base)


def decl_at(defs, path):
    return dict(tree.paths(defs, is_leaf=is_decl))[path]


def reassemble(pieces: list[tuple[tuple[slice, ...], torch.Tensor]], shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the primary pieces into a zero tensor, and how many times each element was written."""
    out, hits = torch.zeros(shape), torch.zeros(shape)
    for sl, t in pieces:
        out[sl] += t
        hits[sl] += 1
    return out, hits


# ----------------------------------------------------------------------------- tensor parallel
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_placements_slices_and_primary_cover_every_leaf_once(tp):
    """On every rank, init equals the full draw cut at leaf_slice; the primary pieces of all
    ranks tile every leaf exactly once (what a reshardable checkpoint writes)."""
    cfg = gqa()  # kv_heads=2: tp=4 replicates each K/V head on 2 ranks
    plain = build(cfg)
    full = dict(tree.paths(pmodel.init(plain, seed=3)))
    pieces: dict[str, list] = {}
    for r in range(tp):
        model = tensor_parallel(plain, fake_mesh(r, tp=tp))
        layout = model.layout
        assert layout.rules == dict(TP_RULES) and layout.norm_dims == ("tp",)
        local = pmodel.init(model, seed=3)
        for (path, decl), (_, leaf) in zip(tree.paths(model.defs, is_leaf=is_decl),
                                           tree.paths(local, is_leaf=ops.is_wrapper)):
            sl = layout.leaf_slice(path, decl)
            t = leaf.shard if ops.is_wrapper(leaf) else leaf  # Column / Row / VocabParallel
            assert torch.equal(t, full[path][sl]), path
            if layout.is_primary(path, decl):
                pieces.setdefault(path, []).append((sl, t.detach()))
    for path, t in full.items():
        got, hits = reassemble(pieces[path], t.shape)
        assert torch.equal(hits, torch.ones_like(hits)), path
        assert torch.equal(got, t.detach()), path


def test_tp_roles_reductions_and_norm_weights():
    cfg = gqa(num_kv_heads=1)
    for r in range(4):
        model = tensor_parallel(build(cfg), fake_mesh(r, tp=4), sequence_parallel=True)
        lay, defs = model.layout, model.defs
        pl = {p: lay.placement(p, d) for p, d in tree.paths(defs, is_leaf=is_decl)}
        q, k, o = (pl[f"layers.0.attn.{n}_proj.weight"] for n in "qko")
        assert (q.role, q.dims, q.index[0]) == ("column", ("tp", None), slice(8 * r, 8 * r + 8))
        assert (k.role, k.replica, k.copies["tp"], k.norm_weight) == ("kv_replica", (0, 1), 4, 0.25)
        assert pl["layers.0.attn.k_proj.bias"].role == "kv_replica_bias"
        assert (o.role, o.index[1]) == ("row", slice(8 * r, 8 * r + 8))
        assert pl["embed.weight"].role == "vocab" and pl["embed.weight"].index[0] == slice(16 * r, 16 * r + 16)
        norm = pl["layers.1.post_attn_norm.weight"]
        assert (norm.role, norm.partial, norm.norm_weight) == ("replicated", ("tp",), 0.25)
        assert norm.data == ("cp", "ep", "dp")
        assert pl["layers.0.attn.o_proj.bias"].partial == ("tp",)  # row bias under SP
        assert q.partial == () and q.norm_weight == 1.0
        assert [red.name for red in lay.reductions] == ["sequence_parallel"]  # no composites here
        # the step's after-backward work, by mesh dim: SP's norms and row biases
        assert set(lay.partial_grads(defs)["tp"]) == {p for p, s in pl.items() if s.role == "replicated"}
        primary = {p: lay.is_primary(p, decl_at(defs, p)) for p in pl}
        assert primary["final_norm.weight"] == primary["layers.0.attn.k_proj.weight"] == (r == 0)
        assert primary["layers.0.attn.q_proj.weight"]
        k_decl = decl_at(defs, "layers.0.attn.k_proj.weight")
        assert lay.leaf_slice("layers.0.attn.k_proj.weight", k_decl) == (slice(0, 8), slice(0, 32))


def test_tp_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="num_heads 4 is not divisible by tp=8"):
        tensor_parallel(build(gqa()), fake_mesh(0, tp=8))
    with pytest.raises(ValueError, match="sequence parallel needs"):
        tensor_parallel(build(gqa()), fake_mesh(0, tp=1), sequence_parallel=True)
    once = tensor_parallel(build(gqa()), fake_mesh(0, tp=2))
    with pytest.raises(ValueError, match="already applied"):
        tensor_parallel(once, fake_mesh(0, tp=2))
    with pytest.raises(ValueError, match="lora"):
        L.lora(once, 4, 8)
    with pytest.raises(ValueError, match="contradict"):
        once.layout.extend(rules={"heads": "ep"})
    with pytest.raises(ValueError, match="only be split over"):
        Layout(mesh=fake_mesh(0, tp=2), rules={"heads": "dp"})


# ----------------------------------------------------------------------------- LoRA children
def test_lora_children_placements_by_global_path():
    """LoRA is found as a composite (by the protocol base class, tensor.py never imports lora):
    its children are cut by their own axes and its replicated factor's gradient is partial."""
    lm = L.lora(build(gqa(num_kv_heads=1)), 4, 8, targets="all")
    for r in range(2):
        model = tensor_parallel(lm, fake_mesh(r, tp=2))
        lay = model.layout
        pl = {p: lay.placement(p, d) for p, d in tree.paths(model.defs, is_leaf=is_decl)}
        a, b = pl["layers.0.attn.q_proj.weight.a"], pl["layers.0.attn.q_proj.weight.b"]
        assert (a.role, a.partial, a.composite) == ("replicated", ("tp",), "layers.0.attn.q_proj.weight")
        assert (b.role, b.index[0], b.partial) == ("column", slice(16 * r, 16 * r + 16), ())
        oa, ob = pl["layers.1.mlp.down_proj.weight.a"], pl["layers.1.mlp.down_proj.weight.b"]
        assert (oa.role, oa.index[1], ob.role, ob.partial) == ("row", slice(24 * r, 24 * r + 24), "replicated", ("tp",))
        kb = pl["layers.0.attn.v_proj.weight.b"]
        assert (kb.role, kb.replica, kb.norm_weight) == ("kv_replica", (0, 1), 0.5)
        a_path = "layers.0.attn.q_proj.weight.a"
        assert lay.is_primary(a_path, decl_at(model.defs, a_path)) == (r == 0)
        # params keep the single-process paths, children plain tensors (wrapped when the block runs)
        params = pmodel.init(model, seed=1)
        node = params["layers"][0]["attn"]["q_proj"]["weight"]
        assert isinstance(node, L.LoRA) and node.b.shape == (16, 4) and type(node.base) is torch.Tensor
        partial = lay.partial_grads(model.defs)["tp"]
        assert partial == [p for p, s in pl.items() if s.partial]
        assert all(p.endswith((".a", ".b")) for p in partial)


def test_sync_grads_on_a_pipeline_stage_subset():
    """A stage's defs (``layers`` a dict keyed by the global index): global paths, its leaves only."""
    lm = L.lora(build(gqa(num_layers=4)), 4, 8, targets="all")
    model = tensor_parallel(lm, fake_mesh(1, tp=2, pp=2), sequence_parallel=True)
    stage = {"layers": {str(i): model.defs["layers"][i] for i in (2, 3)}, "final_norm": model.defs["final_norm"]}
    todo = model.layout.partial_grads(stage)["tp"]
    assert todo[0].startswith("layers.2.") and "final_norm.weight" in todo
    assert not any(p.startswith(("layers.0.", "layers.1.")) for p in todo)
    params = pmodel.init(stage, seed=0, shard=model.layout)
    flat = dict(tree.paths(params))
    for p in todo:
        if flat[p].requires_grad:
            flat[p].grad = torch.ones_like(flat[p])
    pmodel.parallel.sync_replicated_grads(model.replace(defs=stage), params)  # identity: no group
    assert all(flat[p].grad is None or torch.equal(flat[p].grad, torch.ones_like(flat[p])) for p in todo)
    from pmodel.parallel.optimizer import norm_weights
    w = norm_weights(model.replace(defs=stage), params)
    assert len(w) == len(tree.leaves(params)) and set(w) == {0.5, 1.0}


# ----------------------------------------------------------------------------- a second rule: experts -> ep
class ToyExperts(WeightWrapper):
    """Stand-in for an expert-parallel wrapper: this rank's experts ``[first, first + n)``."""

    __slots__ = ("w", "first")

    def __init__(self, w, first: int):
        self.w, self.first = w, int(first)

    def main_tensor(self):
        return self.w

    @property
    def shape(self):
        return tuple(self.w.shape)


tree.register_node(ToyExperts, lambda n: ([n.w], n.first), lambda kids, first: ToyExperts(kids[0], first), ("w",))


def toy_expert_parallel(model, mesh):
    """A toy second sharding transform: adds the rule ``experts -> ep`` and wraps expert leaves."""
    layout = model.layout or Layout(mesh=mesh)
    wrapping = Wrapping(name="toy_expert_parallel", claims=lambda s: "ep" in s.dims and len(s.shape) == 3,
                        wrap=lambda s, t: ToyExperts(t, s.index[0].start))
    return model.replace(layout=layout.extend(rules={"experts": "ep"}, units={"experts": 4}, wrappings=(wrapping,)),
                         transforms=model.transforms + ("toy_expert_parallel",))


def with_toy_experts(model):
    D, F, E = model.config.hidden_size, model.config.ffn_hidden_size, 4
    defs = dict(model.defs)
    defs["toy_moe"] = {"w_in": P(shape=(E, F, D), axes=("experts", "mlp", "embed")),   # [E, out, in]
                       "w_out": P(shape=(E, D, F), axes=("experts", "embed", "mlp")),  # [E, out, in]
                       "gate": P(shape=(E,), axes=("experts",), init="ones")}
    return model.replace(defs=defs)


def test_toy_expert_rule_composes_with_tensor_parallel():
    """tp=2 x ep=2: an expert weight ("experts", "embed", "mlp") is split over ep (dim 0) and tp
    (dim 2, a row-parallel matrix per expert); its gradient is reduced over dp and cp, not ep;
    the non-expert leaves are replicated over ep, which the norm weights and primaries count."""
    plain = with_toy_experts(build(gqa()))
    full = dict(tree.paths(pmodel.init(plain, seed=2)))
    pieces: dict[str, list] = {}
    for rank in range(4):
        mesh = fake_mesh(rank, tp=2, ep=2)
        t, e = mesh.rank("tp"), mesh.rank("ep")
        model = tensor_parallel(toy_expert_parallel(plain, mesh), mesh, sequence_parallel=True)
        lay = model.layout
        assert lay.rules == {**TP_RULES, "experts": "ep"} and lay.norm_dims == ("tp", "ep")
        assert [w.name for w in lay.wrappings] == ["toy_expert_parallel", "tensor_parallel"]
        pl = {p: lay.placement(p, d) for p, d in tree.paths(model.defs, is_leaf=is_decl)}
        w_out, w_in, gate = pl["toy_moe.w_out"], pl["toy_moe.w_in"], pl["toy_moe.gate"]
        assert (w_out.dims, w_out.role) == (("ep", None, "tp"), "row")
        assert w_out.index == (slice(2 * e, 2 * e + 2), slice(0, 32), slice(24 * t, 24 * t + 24))
        assert (w_in.dims, w_in.role, w_in.index[1]) == (("ep", "tp", None), "column", slice(24 * t, 24 * t + 24))
        assert (w_out.data, w_out.norm_weight, w_out.partial) == (("cp", "dp"), 1.0, ())
        # the gate vector: split over ep, replicated over tp (used on sequence shards under SP)
        assert (gate.role, gate.index) == ("replicated", (slice(2 * e, 2 * e + 2),))
        assert (gate.norm_weight, gate.partial) == (0.5, ("tp",))
        q, norm = pl["layers.0.attn.q_proj.weight"], pl["final_norm.weight"]
        assert (q.data, q.norm_weight, norm.norm_weight) == (("cp", "ep", "dp"), 0.5, 0.25)
        params = pmodel.init(model, seed=2)
        assert isinstance(params["toy_moe"]["w_out"], ToyExperts) and params["toy_moe"]["w_out"].first == 2 * e
        assert isinstance(params["layers"][0]["attn"]["q_proj"]["weight"], ColumnParallel)
        assert type(params["toy_moe"]["gate"]) is torch.Tensor  # no transform claims a vector
        for path, leaf in tree.paths(params):
            gp = path.removesuffix(".shard").removesuffix(".w")
            decl = decl_at(model.defs, gp)
            assert torch.equal(leaf, full[gp][lay.leaf_slice(gp, decl)]), path
            assert lay.is_primary(gp, decl) == all(mesh.rank(d) % pl[gp].copies[d] == 0 for d in ("tp", "ep"))
            if lay.is_primary(gp, decl):
                pieces.setdefault(gp, []).append((lay.leaf_slice(gp, decl), leaf.detach()))
    for path, t in full.items():
        got, hits = reassemble(pieces[path], t.shape)
        assert torch.equal(hits, torch.ones_like(hits)) and torch.equal(got, t.detach()), path


def test_an_unclaimed_split_leaf_is_refused():
    """Without the expert transform, TP has no wrapper for a 3-d row-parallel expert weight."""
    with pytest.raises(NotImplementedError, match="toy_moe.w_in .* no transform wraps it"):
        tensor_parallel(with_toy_experts(build(gqa())), fake_mesh(0, tp=2))


# ----------------------------------------------------------------------------- the weight protocol
class Scaled(WeightWrapper):
    """A toy weight wrapper ``s · W`` (a trainable scalar ``s``) that tensor.py does not know."""

    __slots__ = ("w", "s")

    def __init__(self, w, s):
        self.w, self.s = w, s

    def main_tensor(self):
        return self.w

    @property
    def shape(self):
        return tuple(self.w.shape)

    def map_rows(self, f):
        return Scaled(map_rows(self.w, f), self.s)

    def linear(self, x, bias=None, *, kernels=None, in_shard=None):
        y = ops.linear(x, self.w, kernels=kernels, in_shard=in_shard) * self.s  # (..., out)
        return y if bias is None else y + bias


tree.register_node(Scaled, lambda n: ([n.w, n.s], None), lambda kids, _: Scaled(*kids), ("w", "s"))


def _scale_init(shape, gen):
    return torch.full(shape, 1.25) + 0.1 * torch.rand(shape, generator=gen)


def scaled_model(cfg):
    """Every projection weight of the decoder wrapped as ``Scaled(W, s)`` with its own ``s``."""
    model = build(cfg)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def go(path, d):
        if path.startswith("layers.") and path.endswith(".weight") and path.split(".")[-2] in names:
            return Scaled(d, P(shape=(), axes=(), init=_scale_init))
        return d

    return model.replace(defs=tree.map_with_path(go, model.defs, is_leaf=is_decl))


def test_protocol_is_spoken_by_every_wrapper():
    w = torch.randn(6, 4)
    lora_leaf = L.LoRA(w, torch.randn(2, 4), torch.randn(6, 2), scale=2.0)
    for leaf in (lora_leaf, Scaled(w, torch.tensor(2.0)), ColumnParallel(w, group=None, sequence_parallel=False),
                 RowParallel(Scaled(w, torch.tensor(2.0)), group=None, sequence_parallel=False)):
        assert isinstance(leaf, ops.Weight) and ops.is_wrapper(leaf), type(leaf)
        assert (leaf.dtype, leaf.device, tuple(leaf.shape)) == (w.dtype, w.device, (6, 4))
    x = torch.randn(3, 4)
    torch.testing.assert_close(ops.linear(x, Scaled(w, torch.tensor(2.0))), 2 * x @ w.T)
    # map_rows reaches the rows of a wrapper it does not know: LoRA's base and b, not a
    rows = lora_leaf.map_rows(lambda t: t * 0)
    assert not rows.base.any() and not rows.b.any() and torch.equal(rows.a, lora_leaf.a)
    with pytest.raises(TypeError, match="does not implement embedding"):
        ops.embedding(torch.zeros(2, dtype=torch.long), Scaled(w, torch.tensor(1.0)))
    # in_shard: a row shard of LoRA dropout draws the full mask and keeps its columns
    d = L.LoRA(torch.zeros(6, 8), torch.randn(2, 8), torch.randn(6, 2), scale=1.0, dropout=0.5, key=11)
    xs = torch.randn(5, 8)
    halves = [L.LoRA(d.base[:, c], d.a[:, c], d.b, 1.0, 0.5, key=11).linear(xs[:, c], in_shard=(c.start, 8))
              for c in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(halves[0] + halves[1], d.linear(xs))


def test_toy_wrapper_placements():
    model = tensor_parallel(scaled_model(gqa()), fake_mesh(1, tp=2))
    lay = model.layout
    assert "layers.0.attn.o_proj.weight" in lay.composites
    s = lay.placement("layers.0.attn.o_proj.weight.s", decl_at(model.defs, "layers.0.attn.o_proj.weight.s"))
    assert (s.role, s.partial, s.composite) == ("replicated", ("tp",), "layers.0.attn.o_proj.weight")
    w = lay.placement("layers.0.attn.o_proj.weight.w", decl_at(model.defs, "layers.0.attn.o_proj.weight.w"))
    assert (w.role, w.index[1]) == ("row", slice(16, 32))


def _toy_worker(rank, world):
    import _parallel_checks as C
    from pmodel.parallel import sync_replicated_grads
    res = {}
    mesh = Mesh.build(tp=world)
    for name, cfg in (("gqa", C.gqa_config()), ("mqa", C.mqa_config())):
        plain = scaled_model(cfg)
        full = pmodel.init(plain, seed=4)
        batch = C.make_batch(cfg)
        ref_loss, ref_grads = C.full_grads(plain, full, batch)
        for sp in (False, True):
            tag = f"[scaled tp{world} {name}{' sp' if sp else ''}]"
            model = tensor_parallel(plain, mesh, sequence_parallel=sp)
            params = pmodel.init(model, seed=4)
            loss, _ = model.loss(params, batch)
            loss.backward()
            sync_replicated_grads(model, params)
            res[f"{tag} loss"] = C.close(loss.detach(), ref_loss)
            want = C.local_of(model.layout, model.defs, ref_grads)
            bad = [f"{p}: {C.close(t.grad, want[p]) if t.grad is not None else 'no grad'}"
                   for p, t in tree.paths(params) if t.grad is None or C.close(t.grad, want[p])]
            res[f"{tag} grads (scales included)"] = "; ".join(bad) or None
    return res


@pytest.mark.multiproc
def test_toy_wrapper_under_tensor_parallel_equals_single_process():
    """``Scaled`` at column (q/k/v, gate/up, replicated K/V on MQA) and row (o, down) positions:
    loss and every gradient, the replicated scales' included, equal the single process."""
    assert_all_ok(launch(_toy_worker, 2, timeout_s=240))
