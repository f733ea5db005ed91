"""LoRA under tensor parallelism (gloo, TP=2) equals single-process LoRA.

``tensor_parallel(lora(model))``: the parallel roles come from the factors' logical axes
(``b`` of a column-parallel projection is column parallel, ``a`` of a row-parallel one is row
parallel, the other factor replicated), so each rank holds LoRA(shard, ...) leaves. One launch
runs every check: GQA with kv_heads == tp and MQA (K/V heads replicated over ranks), with and
without sequence parallel.
"""
from __future__ import annotations

import pytest

from _dist import assert_all_ok, launch


def _worker(rank, world):
    import re

    import torch

    import _parallel_checks as C
    import pmodel
    from pmodel import lora as L
    from pmodel import tree
    from pmodel.model import build
    from pmodel.parallel import Mesh
    from pmodel.parallel import layout_of, sync_replicated_grads, tensor_parallel

    res = {}
    mesh = Mesh.build(tp=world)
    for cfg_name, cfg in (("gqa", C.gqa_config()), ("mqa", C.mqa_config(num_kv_heads=1, position="rope"))):
        lm = L.lora(build(cfg), 4, 8, targets="all")
        # random B (not zeros) so the adapters change the outputs and get every gradient
        lm = lm.replace(defs=tree.map(lambda n: n.replace(b=n.b.replace(init="normal", std=0.1)) if L.is_lora(n) else n,
                                      lm.defs, is_leaf=L.is_lora))
        full = pmodel.init(lm, seed=3)
        batch = C.make_batch(cfg)
        ref_logits = lm.apply(full, batch["tokens"]).detach()
        ref_loss, _ = lm.loss(full, batch)
        ref_loss.backward()
        ref_grads = {p: t.grad for p, t in tree.paths(full) if t.grad is not None}
        for sp in (False, True):
            tag = f"[lora tp{world} {cfg_name}{' sp' if sp else ''}]"
            model = tensor_parallel(lm, mesh, sequence_parallel=sp)
            params = pmodel.init(model, seed=3)
            layout = layout_of(model)
            # The params keep the single-process structure and paths (local shards inside); the
            # parallel wrapper goes around the whole LoRA node when the block runs.
            kinds = {"/".join(type(t).__name__ for t in (n.base, n.a, n.b)) for _, n in
                     tree.paths(params, is_leaf=L.is_lora) if L.is_lora(n)}
            factor = re.compile(r"\.weight\.(base|a|b)$")
            same_paths = {p for p, _ in tree.paths(params) if factor.search(p)} == {
                p for p, _ in tree.paths(full) if factor.search(p)}
            res[f"{tag} LoRA leaves hold plain local shards, single-process paths"] = (
                None if kinds == {"Tensor/Tensor/Tensor"} and same_paths else f"{kinds}, same paths {same_paths}")
            res[f"{tag} logits"] = C.close(model.apply(params, batch["tokens"]).detach(), ref_logits)
            loss, _ = model.loss(params, batch)
            loss.backward()
            sync_replicated_grads(model, params)
            res[f"{tag} loss"] = C.close(loss.detach(), ref_loss.detach())
            want = C.local_of(layout, model.defs, {p: ref_grads.get(p, torch.zeros_like(t)) for p, t in
                                                   tree.paths(full)})
            got = {p: t for p, t in tree.paths(params)}
            bad, n = [], 0
            for p, t in got.items():
                if re.search(r"\.weight\.[ab](\.shard)?$", p):  # a factor, maybe a parallel shard
                    n += 1
                    msg = C.close(t.grad, want[p]) if t.grad is not None else "no grad"
                    if msg:
                        bad.append(f"{p}: {msg}")
                elif t.grad is not None:
                    bad.append(f"{p}: frozen leaf got a gradient")
            res[f"{tag} adapter grads ({n} factors), frozen leaves none"] = "; ".join(bad) or (
                None if n == 2 * len(L.spec_of(lm).modules) else f"only {n} factors")
    return res


@pytest.mark.multiproc
def test_lora_tp2_equals_single_process():
    assert_all_ok(launch(_worker, 2, timeout_s=240))
