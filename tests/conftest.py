"""Shared test fixtures. Tests that need ../shared/data skip when it is absent (fresh clone)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present (fresh clone); this test needs the real test data")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


class Worlds:
    """Multi-process check results, one launch per (worker, world size, args) per session.

    The equivalence workers (tests/_parallel_checks.py, tests/test_pipeline_dist.py) run many
    named checks in one gloo world and return ``{check name: None or failure message}`` per rank;
    launching a world costs seconds to minutes, so every test case of a world shares one launch
    (or its failure) and asserts one check.
    """

    def __init__(self):
        self._done: dict = {}

    def results(self, fn, world: int, *args, timeout_s: float) -> list[dict]:
        """The per-rank result dicts of ``fn`` on ``world`` ranks (launched on first use)."""
        from _dist import launch
        key = (fn.__module__, fn.__qualname__, world, args)
        if key not in self._done:
            try:
                self._done[key] = ("ok", launch(fn, world, *args, timeout_s=timeout_s))
            except AssertionError as e:  # a rank raised or hung: every case of this world fails with it
                self._done[key] = ("error", str(e))
        status, value = self._done[key]
        if status == "error":
            pytest.fail(f"the {world}-rank launch of {fn.__qualname__} failed:\n{value}", pytrace=False)
        return value

    @staticmethod
    def assert_check(results: list[dict], name: str) -> None:
        """Every rank reported check ``name`` and none reported a failure for it."""
        bad = [f"rank {r}: " + ("did not report it (the worker and the check list in the test file are "
                                "out of sync)" if name not in res else str(res[name]))
               for r, res in enumerate(results) if name not in res or res[name]]
        assert not bad, f"{name}:\n" + "\n".join(bad)

    @staticmethod
    def assert_listed(results: list[dict], listed) -> None:
        """The workers returned exactly the listed checks (no unlisted, none missing)."""
        got = set().union(*results)
        unlisted, absent = sorted(got - set(listed)), sorted(set(listed) - got)
        assert not unlisted and not absent, (f"checks returned but not listed: {unlisted}; "
                                             f"listed but not returned: {absent}")


def check_id(name: str) -> str:
    """A pytest id for a check name: ``"[tp2 gqa sp] logits"`` -> ``"tp2_gqa_sp-logits"``,
    ``"pp2 1f1b: loss"`` -> ``"pp2_1f1b-loss"``."""
    tag, _, rest = name.partition("] ") if name.startswith("[") else name.rpartition(": ")
    if not rest:
        tag, rest = "", name
    parts = [re.sub(r"[^0-9A-Za-z=.]+", "_", p).strip("_") for p in (tag, rest) if p]
    return "-".join(parts)


def pytest_make_parametrize_id(config, val, argname):
    # Tests parametrized over worker check names (argument ``check``) get readable ids, so
    # ``pytest tests/test_parallel.py -k tp2_gqa_sp`` selects by layout and model.
    return check_id(val) if argname == "check" and isinstance(val, str) else None


@pytest.fixture(scope="session")
def worlds() -> Worlds:
    return Worlds()
