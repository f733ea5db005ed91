"""Multi-process equivalence tests for tensor / sequence / data parallelism and the sharded
optimizer (gloo, one thread per rank).

One launch per world size runs every check inside (tests/_parallel_checks.py); each named check
is its own test case sharing that launch (the ``worlds`` fixture in conftest.py), so
``pytest tests/test_parallel.py -k "tp2_gqa_sp"`` launches one world and reports per check. The
check names are listed here so that pytest can collect them without launching; a worker that
returns an unlisted check, or misses a listed one, fails ``test_world*_checks_are_listed``.
"""
from __future__ import annotations

import pytest


def _world(rank, world, which):
    import _parallel_checks as C
    return C.run_world(rank, world, which)


def _tagged(tag: str, *checks: str) -> tuple[str, ...]:
    return tuple(f"[{tag}] {c}" for c in checks)


COMM = (
    "copy_to_tp fwd", "copy_to_tp bwd", "reduce_from_tp fwd", "reduce_from_tp bwd",
    "gather_from_tp fwd", "gather_from_tp bwd", "scatter_to_sequence fwd", "scatter_to_sequence bwd",
    "gather_from_sequence fwd rg=True", "gather_from_sequence bwd rg=True",
    "gather_from_sequence fwd rg=False", "gather_from_sequence bwd rg=False",
    "reduce_scatter_to_sequence fwd", "reduce_scatter_to_sequence bwd", "all_to_all fwd", "all_to_all bwd",
)
# check_model_equivalence: the sharded forward / backward equals the single-process one.
_EQUIV = ("init == slice of full draw", "init keeps only shards", "logits", "loss")
GQA = _EQUIV + ("grads (35 leaves)",)
MQA = _EQUIV + ("grads (25 leaves)",)
# check_training: variants of dp training against each other (and the single process).
_VARIANTS = (("plain", "plain"), ("overlap", "plain"), ("distributed", "distributed"),
             ("distributed+overlap", "distributed"), ("replica", "replica"))
TRAIN = tuple(c for name, layout in _VARIANTS for c in (
    f"{name}: reduced once per step", f"{name}: memory estimate within 5% of measured ({layout})")) + (
    "distributed optimizer == plain adamw (5 steps)", "distributed+overlap == plain adamw",
    "overlap on == off (bitwise)", "replica == distributed")
LORA_TRAIN = ("adapter updates after 3 sgd steps == single process", "frozen weights unchanged",
              "every adapter moved")

CHECKS_2 = (
    *COMM,
    *_tagged("tp2 gqa", *GQA), *_tagged("tp2 gqa sp", *GQA), *_tagged("tp2 mqa", *MQA), *_tagged("tp2 mqa sp", *MQA),
    *_tagged("lora tp2 gqa", "loss with dropout", "adapter grads with dropout (28 factors)"),
    *_tagged("lora tp2 mqa sp", "loss with dropout", "adapter grads with dropout (24 factors)"),
    *_tagged("lora tp2 sp train", *LORA_TRAIN),
    *_tagged("dp2 gqa", *GQA), *_tagged("dp2 mqa", *MQA),
    *_tagged("dp train gqa", *TRAIN, "plain dp adamw, 5 steps == single process"),
)
CHECKS_4 = (
    *COMM,
    *_tagged("tp4 gqa", *GQA), *_tagged("tp4 gqa sp", *GQA), *_tagged("tp4 mqa", *MQA), *_tagged("tp4 mqa sp", *MQA),
    *_tagged("dp4 gqa", *GQA), *_tagged("dp4 mqa", *MQA),
    *_tagged("dp train gqa", *TRAIN, "plain dp adamw, 5 steps == single process"),
    *_tagged("tp2xdp2 gqa", *GQA), *_tagged("tp2xdp2 gqa sp", *GQA),
    *_tagged("tp2xdp2 mqa", *MQA), *_tagged("tp2xdp2 mqa sp", *MQA),
    *_tagged("tp2xdp2 train gqa", *TRAIN),
    *_tagged("lora tp2xdp2 sp train", *LORA_TRAIN, "distributed+overlap adamw == plain adamw"),
)


def _results(worlds, world):
    return worlds.results(_world, world, "all", timeout_s=240)


@pytest.mark.multiproc
@pytest.mark.parametrize("check", CHECKS_2)
def test_world2(worlds, check):
    """comm, TP2 (+SP), DP2, LoRA under TP2, dp training variants."""
    worlds.assert_check(_results(worlds, 2), check)


@pytest.mark.multiproc
def test_world2_checks_are_listed(worlds):
    worlds.assert_listed(_results(worlds, 2), CHECKS_2)


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("check", CHECKS_4)
def test_world4(worlds, check):
    """comm, TP4 (+SP), DP4, TP2 x DP2, the replica optimizer, LoRA under TP2 x DP2."""
    worlds.assert_check(_results(worlds, 4), check)


@pytest.mark.multiproc
@pytest.mark.slow
def test_world4_checks_are_listed(worlds):
    worlds.assert_listed(_results(worlds, 4), CHECKS_4)
