"""Pipeline pieces that need no processes: split validation, schedule orders, pp=1 equivalence."""
from __future__ import annotations

import pytest
import torch

import pmodel
from pmodel import tree
from pmodel.parallel.mesh import Mesh
from pmodel.parallel.pipeline import Op, pipeline, schedule_ops, split_layers


def test_split_layers_even_uneven_virtual():
    assert split_layers(4, 2) == ((0, 2), (2, 2))
    assert split_layers(4, 2, [1, 3]) == ((0, 1), (1, 3))
    # Virtual stage v = chunk * pp + rank: rank 0 runs layers 0 and 2, rank 1 runs 1 and 3.
    assert split_layers(4, 2, None, 2) == ((0, 1), (1, 1), (2, 1), (3, 1))
    assert split_layers(8, 2, [2, 6], 2) == ((0, 1), (1, 3), (4, 1), (5, 3))


@pytest.mark.parametrize("args, msg", [
    ((4, 2, [1, 2]), "sums to 3"),
    ((4, 2, [1, 1, 2]), "expected one per pipeline stage"),
    ((4, 2, [0, 4]), "no layers"),
    ((5, 2), "do not split evenly"),
    ((4, 2, [1, 3], 2), "not divisible by virtual_stages"),
])
def test_split_layers_rejects(args, msg):
    with pytest.raises(ValueError, match=msg):
        split_layers(*args)


def test_1f1b_order_pp2_m4():
    kinds = lambda ops: [(o.kind, o.microbatch) for o in ops]  # noqa: E731
    assert kinds(schedule_ops("1f1b", 2, 0, 4)) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1),
                                                    ("F", 3), ("B", 2), ("B", 3)]
    assert kinds(schedule_ops("1f1b", 2, 1, 4)) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2),
                                                    ("B", 2), ("F", 3), ("B", 3)]


@pytest.mark.parametrize("sched, P, M, V", [("1f1b", 4, 3, 1), ("1f1b", 4, 8, 1), ("zero-bubble", 4, 6, 1),
                                            ("zero-bubble", 2, 1, 1), ("interleaved", 2, 4, 2),
                                            ("interleaved", 4, 8, 2), ("interleaved", 2, 2, 3)])
def test_schedules_cover_every_op_once_in_dependency_order(sched, P, M, V):
    for r in range(P):
        ops = schedule_ops(sched, P, r, M, V)
        kinds = "FBW" if sched == "zero-bubble" else "FB"
        assert sorted(ops) == sorted(Op(k, j, c) for k in kinds for j in range(M) for c in range(V))
        pos = {op: i for i, op in enumerate(ops)}
        for j in range(M):
            for c in range(V):
                assert pos[Op("F", j, c)] < pos[Op("B", j, c)]
                if sched == "zero-bubble":
                    assert pos[Op("B", j, c)] < pos[Op("W", j, c)]
            # Chunks run forward in order and backward in reverse order.
            for c in range(V - 1):
                assert pos[Op("F", j, c)] < pos[Op("F", j, c + 1)]
                assert pos[Op("B", j, c + 1)] < pos[Op("B", j, c)]


def test_zero_bubble_last_rank_runs_w_right_after_b():
    ops = schedule_ops("zero-bubble", 4, 3, 4)
    assert [o.kind for o in ops] == list("FBW" * 4)


@pytest.mark.parametrize("kw, msg", [
    (dict(schedule="gpipe"), "unknown schedule"),
    (dict(schedule="interleaved", virtual_stages=1), "virtual_stages >= 2"),
    (dict(schedule="1f1b", virtual_stages=2), "needs schedule='interleaved'"),
    (dict(microbatches=0), "positive int"),
    (dict(layers_per_stage=[4, 1]), "one per pipeline stage"),
])
def test_pipeline_rejects(kw, msg):
    model = pmodel.families.preset("debug", num_layers=4)
    with pytest.raises(ValueError, match=msg):
        pipeline(model, Mesh.single(), **kw)


@pytest.mark.parametrize("M", [1, 2, 4])
def test_single_stage_equals_model_loss(M):
    """pp = 1: micro-batch accumulation with the global token count is the plain mean."""
    model = pmodel.families.preset("debug", num_layers=2)
    pipe = pipeline(model, Mesh.single(), "1f1b", microbatches=M)
    params = pipe.init(seed=1)
    full = pmodel.init(model, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (4, 12), generator=g)
    labels = torch.randint(0, 512, (4, 12), generator=g)
    labels[0, :9] = -100  # micro-batches with very different token counts: a 1/M scaling would be wrong
    batch = {"tokens": tokens, "labels": labels}
    loss, aux = pipe.forward_backward(params, batch)
    ref, _ = model.loss(full, batch)
    ref.backward()
    assert torch.allclose(loss, ref.detach(), rtol=1e-6, atol=0)
    assert int(aux["num_tokens"]) == int((labels != -100).sum())
    ref_g = dict(tree.paths(full))
    for path, x in tree.paths(params):
        err = (x.grad - ref_g[path].grad).norm() / ref_g[path].grad.norm()
        assert err <= 1e-5, (path, float(err))


def test_stage_params_keep_global_paths():
    model = pmodel.families.preset("debug", num_layers=2)
    pipe = pipeline(model, Mesh.single(), microbatches=1)
    a = dict(tree.paths(pipe.init(seed=3)))
    b = dict(tree.paths(pmodel.init(model, seed=3)))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_microbatch_split_rejects_indivisible_batch():
    model = pmodel.families.preset("debug", num_layers=2)
    pipe = pipeline(model, Mesh.single(), microbatches=3)
    t = torch.zeros(4, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="not divisible by microbatches=3"):
        pipe.forward_backward(pipe.init(0), {"tokens": t, "labels": t})


def test_stage_params_of_a_full_tree_line_up_with_the_stage_declarations():
    """plan.shard / Pipeline.stage_params must list a stage's leaves in stage_defs order (the
    layout-weighted norm and the checkpoint specs pair leaves with declarations in order); a
    LoRA-adapted last stage used to list final_norm / lm_head before its layers."""
    import pmodel
    from pmodel import lora as L, tree
    from pmodel.params import is_decl
    from pmodel.parallel.pipeline import pipeline
    from pmodel.parallel.plan import offline_mesh
    model = L.lora(pmodel.families.preset("debug", num_layers=4), 4, 8.0, 0.0, "all")
    full = L.adapt(model, pmodel.init(L.base_model(model), seed=0), seed=1)
    for rank in range(2):
        pipe = pipeline(model, offline_mesh({"pp": 2}, rank), "1f1b", microbatches=2)
        got = [p for p, _ in tree.paths(pipe.stage_params(full))]
        want = [p for p, _ in tree.paths(pipe.stage_defs(), is_leaf=is_decl)]
        assert got == want, rank
        assert [p for p, _ in tree.paths(pipe.init(0))] == want
