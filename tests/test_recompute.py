"""Activation recompute: identical gradients, measurably lower peak activation memory."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.utils._pytree as pt
from torch.utils._python_dispatch import TorchDispatchMode

import pmodel
from pmodel import tree
from pmodel.remat import Recompute, recompute


class PeakTensorMemory(TorchDispatchMode):
    """Live / peak bytes of every tensor storage created by an op inside the mode.

    CPU has no ``max_memory_allocated``; this counts each new storage an op returns when it is
    created and subtracts it when the storage is freed (a finalizer on the storage object, which
    PyTorch keeps alive exactly as long as the C++ storage). Parameters created before the mode
    are not counted, so the peak is activations + gradients.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pt.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if id(st) in self._seen:  # a view of a storage already counted
                    continue
                self._seen.add(id(st))
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, id(st), st.nbytes())
        return out


def _setup(**over):
    model = pmodel.families.preset("debug", num_layers=4, **over)
    params = pmodel.init(model, seed=3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 64), generator=g)
    labels = torch.randint(0, 512, (2, 64), generator=g)
    labels[0, :5] = -100
    return model, params, {"tokens": tokens, "labels": labels}


def _run(model, params, batch):
    """(loss, grads, peak bytes) of one forward + backward."""
    for x in tree.leaves(params):
        x.grad = None
    with PeakTensorMemory() as mem:
        loss, _ = model.loss(params, batch)
        loss.backward()
    grads = [(p, x.grad.clone()) for p, x in tree.paths(params)]
    return loss.detach(), grads, mem.peak


VARIANTS = [
    dict(granularity="full"),
    dict(granularity="full", method="uniform", num_layers=2),
    dict(granularity="full", method="uniform", num_layers=3),   # last group shorter
    dict(granularity="full", method="block", num_layers=2),
    dict(granularity="full", method="block", num_layers=4),
    dict(granularity="selective"),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_recompute_identical_gradients_lower_peak(kw):
    model, params, batch = _setup()
    loss0, g0, peak0 = _run(model, params, batch)
    rmodel = recompute(model, **kw)
    loss1, g1, peak1 = _run(rmodel, params, batch)
    # Recompute replays the same ops in the same order: results are bitwise equal on CPU.
    assert torch.equal(loss0, loss1)
    assert [p for p, _ in g0] == [p for p, _ in g1]
    for (path, a), (_, b) in zip(g0, g1):
        assert torch.equal(a, b), path
    assert peak1 < peak0, (kw, peak0, peak1)


def test_recompute_savings_ordering():
    """More recompute keeps less: full per-block < block(2 of 4) < none."""
    model, params, batch = _setup()
    peaks = {name: _run(m, params, batch)[2] for name, m in {
        "none": model,
        "block2": recompute(model, "full", "block", 2),
        "full1": recompute(model, "full", "uniform", 1),
    }.items()}
    assert peaks["full1"] < peaks["block2"] < peaks["none"], peaks


def test_selective_with_padding_mask_and_mha():
    """Selective on the masked path (dense bool mask) with plain multi-head attention."""
    model, params, batch = _setup(num_kv_heads=4)
    am = torch.ones_like(batch["tokens"])
    am[1, :7] = 0
    batch = dict(batch, attention_mask=am)
    loss0, g0, peak0 = _run(model, params, batch)
    loss1, g1, peak1 = _run(recompute(model, "selective"), params, batch)
    assert torch.equal(loss0, loss1)
    for (path, a), (_, b) in zip(g0, g1):
        assert torch.equal(a, b), path
    assert peak1 < peak0, (peak0, peak1)


def test_recompute_inference_and_composition_forward():
    model, params, batch = _setup()
    with torch.no_grad():
        ref = model.apply(params, batch["tokens"])
        for kw in VARIANTS:
            assert torch.equal(recompute(model, **kw).apply(params, batch["tokens"]), ref)
    r = recompute(model, "full", "block", 1)
    assert isinstance(r.layer_runner, Recompute) and r.transforms[-1] == "recompute"
    # Generation with a KV cache runs under no_grad and is unaffected.
    ids = pmodel.generate(r, params, batch["tokens"][:1, :8], max_new_tokens=4, temperature=0.0)
    ids0 = pmodel.generate(model, params, batch["tokens"][:1, :8], max_new_tokens=4, temperature=0.0)
    assert torch.equal(ids, ids0)


@pytest.mark.parametrize("kw, msg", [
    (dict(granularity="partial"), "granularity"),
    (dict(granularity="full", method="every"), "method"),
    (dict(granularity="full", num_layers=0), "num_layers"),
    (dict(granularity="full", num_layers=5), "exceeds"),
    (dict(granularity="selective", method="uniform"), "full' only"),
    (dict(granularity="selective", num_layers=2), "full' only"),
])
def test_recompute_rejects_bad_options(kw, msg):
    model = pmodel.families.preset("debug", num_layers=4)
    with pytest.raises(ValueError, match=msg):
        recompute(model, **kw)


def test_recompute_twice_raises():
    model = recompute(pmodel.families.preset("debug"), "selective")
    with pytest.raises(ValueError, match="once"):
        recompute(model, "full")
