"""Single-process tests of the parallel package: mesh layout, flag validation, memory table."""
from __future__ import annotations

import pytest

from pmodel import optim
from pmodel.model import ModelConfig, build
from pmodel.parallel.memory import bytes_per_param, estimate
from pmodel.parallel.mesh import DIMS, Mesh
from pmodel.parallel.plan import parallelize
from pmodel.parallel.tensor import tensor_parallel


def test_megatron_rank_order_tp_fastest():
    sizes = Mesh.layout(16, tp=2, pp=2, cp=1, ep=1)
    assert sizes == {"tp": 2, "cp": 1, "ep": 1, "dp": 4, "pp": 2}
    # rank = tp + TP*(cp + CP*(ep + EP*(dp + DP*pp)))
    assert Mesh.coords_of(sizes, 5) == {"tp": 1, "cp": 0, "ep": 0, "dp": 2, "pp": 0}
    assert Mesh.coords_of(sizes, 9) == {"tp": 1, "cp": 0, "ep": 0, "dp": 0, "pp": 1}
    for r in range(16):
        assert Mesh.rank_of(sizes, Mesh.coords_of(sizes, r)) == r
    with pytest.raises(ValueError, match="not divisible"):
        Mesh.layout(6, tp=4)
    assert set(Mesh.single().sizes) == set(DIMS)


def test_megatron_bytes_per_param_table():
    for d in (2, 4, 8, 64):
        assert bytes_per_param(layout="plain", dp=d) == 20
        assert bytes_per_param(layout="distributed", dp=d) == 4 + 16 / d
        assert bytes_per_param(layout="replica", dp=d) == 4 + 32 / d
        # bf16 params with fp32 grads: Megatron's 18 and 6 + 12/d
        assert bytes_per_param(layout="plain", dp=d, grad_bytes=4) == 18
        assert bytes_per_param(layout="distributed", dp=d, grad_bytes=4) == 6 + 12 / d


def test_llama2_70b_tp8_pp4_dp4_numbers():
    cfg = ModelConfig(vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                      ffn_hidden_size=28672)
    assert abs(cfg.num_params() - 68.98e9) / 68.98e9 < 1e-3  # the published 69B
    est = estimate(cfg, tp=8, pp=4, dp=4, layout="distributed", seq_len=4096, micro_batch=1,
                   sequence_parallel=True, recompute="none")
    # 80/4 = 20 layers of (heads+kv+mlp)/8 + embedding/8: about 2.19e9 parameters on a rank
    assert 2.1e9 < est.params_per_rank < 2.3e9
    assert est.params == 2 * est.params_per_rank and est.grads == 2 * est.params_per_rank
    assert est.optimizer == 16 / 4 * est.params_per_rank


def test_flags_error_with_reason():
    model = build(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, ffn_hidden_size=64))
    mesh = Mesh.single()
    with pytest.raises(ValueError, match="sequence parallel needs tensor parallel size > 1"):
        tensor_parallel(model, mesh, sequence_parallel=True)
    with pytest.warns(UserWarning, match="data-parallel size 1: there is nothing to shard"):
        plan = parallelize(model, optim.adamw(1e-3), mesh, distributed_optimizer=True)
    assert plan.distributed  # it still runs the distributed optimizer (tested in the gloo runs)
    with pytest.raises(ValueError, match="high_availability .replica optimizer. needs distributed_optimizer"):
        parallelize(model, None, mesh, high_availability=True)
    with pytest.raises(ValueError, match="overlap_grad_reduce needs data-parallel size > 1"):
        parallelize(model, None, mesh, overlap_grad_reduce=True)


def test_memory_estimate_counts_experts_over_ep():
    """Experts / ep, the router and dense parts whole on every ep rank: the estimate's per-rank
    parameter count equals the leaves each rank of the layout holds (computed offline by
    ``rank_specs``, the busiest rank), and the Mixtral-8x7B numbers by hand."""
    import math
    from pmodel.parallel.memory import params_per_rank
    from pmodel.parallel.plan import rank_specs
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, ffn_hidden_size=24,
                      num_experts=4, moe_top_k=2, moe_shared_expert_ffn=16)
    for sizes in ({"ep": 2}, {"ep": 4}, {"ep": 2, "tp": 2}, {"ep": 2, "pp": 2}, {"ep": 2, "tp": 2, "pp": 2}, {"tp": 4}):
        held = max(sum(math.prod(b - a for a, b in spec[2]) for spec in rank.values())
                   for rank in rank_specs(build(cfg), sizes))
        got = params_per_rank(cfg, tp=sizes.get("tp", 1), pp=sizes.get("pp", 1), ep=sizes.get("ep", 1))
        assert got == held, (sizes, got, held)
    mixtral = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                          ffn_hidden_size=14336, rope_theta=1e6, num_experts=8, moe_top_k=2)
    experts = 32 * 8 * 3 * 14336 * 4096                      # 45.1e9 expert parameters
    dense = mixtral.num_params() - experts                   # attention, router, norms, embeddings: 1.6e9
    assert abs(mixtral.num_params() - 46.70e9) / 46.70e9 < 1e-3
    est = estimate(mixtral, ep=8, dp=8, layout="distributed", seq_len=4096)
    assert est.params_per_rank == dense + experts // 8       # 7.24e9 on each of the 8 ranks
    assert est.params == 2 * est.params_per_rank and est.optimizer == 16 / 8 * est.params_per_rank
    est = estimate(mixtral, tp=2, ep=4, pp=4, layout="plain")
    assert est.params_per_rank == params_per_rank(mixtral, tp=2, ep=4, pp=4)
    with pytest.raises(ValueError, match="not divisible"):
        estimate(mixtral, ep=3)
