"""Deterministic mode (--use-deter-comp) and, in the same launches, profiling under torchrun.

* Fixed-order reductions (DP4, gloo): with ``deterministic=True`` a data-parallel bucket sum is
  bitwise the left-to-right sum over dp ranks on every rank, for all-reduce and reduce-scatter
  buckets; gloo's own all-reduce sums in another order (its ring starts each chunk at another
  rank), which the same check tells apart, so the check fails when determinism is off.
* Two runs of scripts/pretrain.py on TP2 x DP2 with the distributed optimizer (ZeRO-1) and
  --use-deter-comp give bitwise-identical losses, gradient norms and checkpoints (parameters,
  optimizer state); the second run is profiled on ranks 0 and 1 over steps 3-4 and writes two
  Chrome traces covering exactly those steps, so profiled steps equal unprofiled ones bitwise.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _dist import assert_all_ok, launch
from test_profiling import trace_steps

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "scripts" / "pretrain.py"


def _order_worker(rank, world):
    from pmodel.parallel import Mesh
    from pmodel.parallel.data import DataParallel
    mesh = Mesh.build()
    n = 4096
    # Every rank draws all ranks' values (same generator) and keeps its own row; magnitudes
    # spread over 1e-3 .. 1e3 so that the summation order shows in the last bits.
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(world, n, generator=g) * 10.0 ** torch.randint(-3, 4, (world, n), generator=g).float()
    ref = vals[0].clone()
    for j in range(1, world):
        ref += vals[j]  # left to right, rank order
    out = {}
    for reduce in ("all_reduce", "reduce_scatter"):
        for det in (False, True):
            p = torch.zeros(n, requires_grad=True)
            dp = DataParallel({"w": p}, mesh, reduce=reduce, deterministic=det, bucket_numel=n)
            dp.buffers[0][:n].copy_(vals[rank])
            dp.finish()
            lo, hi = (0, n) if reduce == "all_reduce" else dp.layout.shard_range(0, mesh.rank("dp"))
            got = dp.buffers[0][lo:hi]
            same = torch.equal(got, ref[lo:hi])
            close = bool(torch.allclose(got, ref[lo:hi], rtol=1e-6, atol=1e-3))
            name = f"{reduce} deterministic={det}"
            if det:
                out[name] = None if same else f"differs from the rank-order sum at {int((got != ref[lo:hi]).sum())}"
            elif reduce == "all_reduce":
                # gloo's ring: the same value up to rounding, in another order
                out[name] = None if close and not same else f"close={close} same={same} (expected close, not same)"
            else:
                out[name] = None if close else "gloo reduce-scatter not close to the sum"
    return out


@pytest.mark.multiproc
def test_fixed_order_reduction_is_the_rank_order_sum_and_gloo_is_not():
    assert_all_ok(launch(_order_worker, 4))


@pytest.mark.multiproc
@pytest.mark.slow
def test_tp2xdp2_zero1_deterministic_runs_are_bitwise_equal_and_profiling_changes_nothing(tmp_path):
    from test_layouts_cli import COMMON, _ranks
    args = [*COMMON, "--train-iters", "10", "--tensor-model-parallel-size", "2", "--use-distributed-optimizer",
            "--global-batch-size", "8", "--use-deter-comp"]
    _ranks(PRETRAIN, [*args, "--save", tmp_path / "a", "--metrics-file", tmp_path / "a.jsonl"], 4)
    out = _ranks(PRETRAIN, [*args, "--save", tmp_path / "b", "--metrics-file", tmp_path / "b.jsonl", "--profile",
                            "--profile-step-start", "3", "--profile-step-end", "5", "--profile-ranks", "0", "1",
                            "--profile-save-path", tmp_path / "prof"], 4)
    assert "pp 1 x dp 2 x tp 2" in out, out
    rec = [[json.loads(x) for x in (tmp_path / f"{r}.jsonl").read_text().splitlines() if '"loss"' in x]
           for r in ("a", "b")]
    key = lambda r: (r["step"], r["loss"], r["grad_norm"], r["lr"])  # noqa: E731
    assert len(rec[0]) == 10 and [key(r) for r in rec[0]] == [key(r) for r in rec[1]]
    for r in range(4):
        a = load_file(tmp_path / "a" / "iter_0000010" / f"rank_{r:05d}.safetensors")
        b = load_file(tmp_path / "b" / "iter_0000010" / f"rank_{r:05d}.safetensors")
        assert sorted(a) == sorted(b)
        assert any(k.startswith("state/") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), (r, k)
    traces = sorted(p.name for p in (tmp_path / "prof").glob("trace_rank*.json"))
    assert traces == ["trace_rank0.json", "trace_rank1.json"]
    for t in traces:
        assert trace_steps(tmp_path / "prof" / t) == [3, 4]
