"""Every new family under the parallel transforms (gloo, 2 ranks, one launch): TP2 and TP2 with
sequence parallel equal one process (logits, loss, every gradient), and PP2 equals one process
(loss, every gradient, left-padded batch). Tiny versions of the presets keep every family
switch: ALiBi under TP (Bloom, Baichuan-13B), MQA groups / a replicated K/V head (ChatGLM3,
Gemma), NormHead on vocab shards (Baichuan2), partial and interleaved rotary, learned
positions with a padded vocabulary (GPT-3).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

V = 512
TINY = {
    "bloom": ("bloom-7b1", dict(hidden_size=32, num_heads=4, ffn_hidden_size=128)),
    "bloom-6heads": ("bloom-7b1", dict(hidden_size=48, num_heads=6, ffn_hidden_size=192)),
    "chatglm3": ("chatglm3-6b", dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, ffn_hidden_size=48)),
    "chatglm3-mqa": ("chatglm3-6b", dict(hidden_size=32, num_heads=4, num_kv_heads=1, head_dim=8,
                                         ffn_hidden_size=48)),
    "gemma": ("gemma-2b", dict(hidden_size=32, num_heads=4, num_kv_heads=1, head_dim=16, ffn_hidden_size=48,
                               embedding_scale=32 ** 0.5)),
    "baichuan2-13b": ("baichuan2-13b", dict(hidden_size=32, num_heads=4, ffn_hidden_size=48)),
    "qwen": ("qwen-7b", dict(hidden_size=32, num_heads=4, head_dim=8, ffn_hidden_size=48, rotary_fraction=0.5)),
    "gpt3": ("gpt3-175b", dict(hidden_size=32, num_heads=4, ffn_hidden_size=128, vocab_size=V - 3, pad_vocab_to=8,
                               max_position_embeddings=64)),
    "internlm": ("internlm-7b", dict(hidden_size=32, num_heads=4, ffn_hidden_size=48)),
}
_MODES = ("tp2", "tp2 sp")
CHECKS = tuple(f"[{m} {name}] {c}" for name in TINY for m in _MODES for c in ("logits", "loss", "grads")) + tuple(
    f"[pp2 {name}]: {c}" for name in TINY for c in ("loss", "grads"))


def tiny(name: str):
    import pmodel
    preset, kw = TINY[name]
    kw = {"num_layers": 2, "vocab_size": V, "num_kv_heads": kw["num_heads"],
          "head_dim": kw["hidden_size"] // kw["num_heads"], **kw}
    return pmodel.families.preset(preset, **kw)


def _worker(rank, world):
    import torch

    import _parallel_checks as C
    import pmodel
    import test_pipeline_dist as P
    from pmodel import tree
    from pmodel.parallel import Mesh
    from pmodel.parallel.layout import layout_of
    from pmodel.parallel.tensor import sync_replicated_grads, tensor_parallel

    def grad_close(a, b):
        # The K bias gradient is exactly zero in exact arithmetic (it adds a per-query constant
        # to the scores, which softmax ignores); both runs give ~1e-12 rounding noise there, so
        # a leaf whose reference gradient is below 1e-9 everywhere is compared absolutely.
        if b.abs().max() < 1e-9:
            return None if a.abs().max() < 1e-9 else f"expected ~0, got max {a.abs().max().item():.3e}"
        return C.close(a, b)

    res = {}
    tp_mesh = Mesh.build(tp=2)
    for name in TINY:
        plain = tiny(name)
        full = pmodel.init(plain, seed=3)
        batch = C.make_batch(plain.config)
        ref_logits = plain.apply(full, batch["tokens"]).detach()
        ref_loss, ref_grads = C.full_grads(plain, full, batch)
        for mode in _MODES:
            tag = f"[{mode} {name}]"
            model = tensor_parallel(plain, tp_mesh, sequence_parallel=mode.endswith("sp"))
            params = pmodel.init(model, seed=3)
            res[f"{tag} logits"] = C.close(model.apply(params, batch["tokens"]).detach(), ref_logits)
            loss, _ = model.loss(params, batch)
            loss.backward()
            sync_replicated_grads(model, params)
            res[f"{tag} loss"] = C.close(loss.detach(), ref_loss)
            want = C.local_of(layout_of(model), model.defs, ref_grads)
            bad = [f"{p}: {grad_close(x.grad, want[p]) if x.grad is not None else 'no grad'}"
                   for p, x in tree.paths(params) if x.grad is None or grad_close(x.grad, want[p])]
            res[f"{tag} grads"] = "; ".join(bad) or None
    from pmodel.parallel.pipeline import pipeline
    pp_mesh = Mesh.build(pp=2)
    for name in TINY:
        torch.manual_seed(0)
        model = tiny(name)
        batch = P._batch()  # left padding in one row
        pipe = pipeline(model, pp_mesh, "1f1b", microbatches=4)
        params = pipe.init(seed=0)
        loss, _ = pipe.forward_backward(params, batch)
        ref_loss, ref_grads, _ = P._reference(model, batch)
        tag = f"[pp2 {name}]"
        res[f"{tag}: loss"] = None if P._rel(loss, ref_loss) <= P.TOL else f"{loss.item()} vs {ref_loss.item()}"
        bad = [f"{p}: {grad_close(x.grad, ref_grads[p])}" for p, x in tree.paths(params)
               if x.requires_grad and (x.grad is None or grad_close(x.grad, ref_grads[p]))]
        res[f"{tag}: grads"] = "; ".join(bad) or None
    return res


def _results(worlds):
    return worlds.results(_worker, 2, timeout_s=400)


@pytest.mark.multiproc
@pytest.mark.parametrize("check", CHECKS)
def test_families_world2(worlds, check):
    worlds.assert_check(_results(worlds), check)


@pytest.mark.multiproc
def test_families_world2_checks_are_listed(worlds):
    worlds.assert_listed(_results(worlds), CHECKS)
