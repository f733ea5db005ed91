"""Activation recompute on every family's switches (tiny versions of the presets, as in
tests/test_families_parallel.py): full recompute (uniform and block) and selective recompute give
the plain model's loss and bitwise-equal gradients (recompute repeats the same ops on the same
values), including the LoRA-adapted model with dropout keys bound."""
from __future__ import annotations

import pytest
import torch

import pmodel
from pmodel import lora as L
from pmodel import tree
from test_families_parallel import TINY, tiny

MODES = {"full uniform 1": ("full", "uniform", 1), "full block 1": ("full", "block", 1),
         "selective": ("selective", None, None)}


def _grads(model, params, batch):
    for x in tree.leaves(params):
        x.grad = None
    loss, _ = model.loss(params, batch)
    loss.backward()
    return loss.detach(), [None if x.grad is None else x.grad.clone() for x in tree.leaves(params)]


@pytest.mark.parametrize("family", list(TINY))
def test_recompute_equals_plain_bitwise(family):
    model = tiny(family)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0  # left padding: masks and positions through the recomputed regions
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "attention_mask": am}
    params = pmodel.init(model, seed=1)
    ref_loss, ref = _grads(model, params, batch)
    for name, (gran, method, n) in MODES.items():
        loss, got = _grads(pmodel.recompute(model, gran, method, n), params, batch)
        assert torch.equal(loss, ref_loss), (family, name)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert (a is None and b is None) or torch.equal(a, b), (family, name, i)
    lm = L.lora(model, 4, 8.0, 0.1, "all")
    lp = L.bind_dropout(L.adapt(lm, params, seed=2), seed=3, step=0)
    ref_loss, ref = _grads(lm, lp, batch)
    loss, got = _grads(pmodel.recompute(lm, "full", "uniform", 1), lp, batch)
    assert torch.equal(loss, ref_loss), family
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, ref)), family
