"""Multi-process equivalence tests for tensor / sequence / data parallelism and the sharded
optimizer (gloo, one thread per rank). One launch per world size runs every check inside
(tests/_parallel_checks.py); failures come back listed by rank and check name."""
from __future__ import annotations

import pytest

from _dist import assert_all_ok, launch


def _world(rank, world, which):
    import _parallel_checks as C
    return C.run_world(rank, world, which)


@pytest.mark.multiproc
def test_world2_comm_tp_sp_dp_optimizer():
    assert_all_ok(launch(_world, 2, "all", timeout_s=240))


@pytest.mark.multiproc
@pytest.mark.slow
def test_world4_tp4_tp2xdp2_replica():
    assert_all_ok(launch(_world, 4, "all", timeout_s=240))
