"""Checks run inside the gloo ranks launched by tests/test_parallel.py (one launch per world size).

Each ``check_*`` returns ``{name: None or failure message}``. Every rank also computes the
single-process reference itself (the models are tiny), so each comparison is local.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import pmodel
from pmodel import tree
from pmodel.model import ModelConfig, build
from pmodel.params import is_decl
from pmodel.parallel import Mesh, comm
from pmodel.parallel.layout import layout_of
from pmodel.parallel.tensor import tensor_parallel

RTOL = 1e-5  # fp32, relative to the reference's largest magnitude


def close(a, b, rtol=RTOL):
    """None if ``a`` matches ``b`` elementwise within ``rtol * (|b| + max|b|)``, else a message."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs()
    tol = rtol * (b.abs() + scale)
    if bool((err > tol).any()):
        i = int((err - tol).argmax())
        return f"max err {err.max().item():.3e} (scale {scale:.3e}); at flat {i}: {a.flatten()[i].item()} vs {b.flatten()[i].item()}"
    return None


# ----------------------------------------------------------------------------- configs
def gqa_config(**kw):
    base = dict(vocab_size=61, pad_vocab_to=4, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffn_hidden_size=48, qkv_bias=True, o_bias=True, mlp_bias=True, position="rope")
    base.update(kw)
    return ModelConfig(**base)


def mqa_config(**kw):
    base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=1, ffn_hidden_size=64,
                norm="layer", position="alibi", activation="gelu", tie_embeddings=True,
                embedding_scale=32 ** 0.5, o_bias=True)
    base.update(kw)
    return ModelConfig(**base)


CONFIGS = {"gqa": gqa_config, "mqa": mqa_config}
# Training compares parameters after 5 Adam steps. The K bias's true gradient is ~0 along the low
# RoPE frequencies (softmax is nearly invariant to a per-query constant), so Adam turns the
# rounding of the dp reduction order (gloo's 4-rank ring differs from a left-to-right sum) into
# 1e-4-relative parameter differences there; training uses the GQA config without q/k/v biases.
TRAIN_CONFIGS = {"gqa_nobias": lambda: gqa_config(qkv_bias=False)}


def make_batch(cfg, B=4, T=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    labels[0, :3] = -100  # some ignored tokens, unevenly spread over the batch
    labels[1, -1] = -100
    return {"tokens": tokens, "labels": labels}


def dp_slice(batch, mesh):
    d, r = mesh.size("dp"), mesh.rank("dp")
    return {k: v.chunk(d, dim=0)[r] for k, v in batch.items()}


def full_grads(model, params, batch):
    for p in tree.leaves(params):
        p.grad = None
    loss, aux = model.loss(params, batch)
    loss.backward()
    return loss.detach(), {path: p.grad.clone() for path, p in tree.paths(params)}


def local_of(layout, model_defs, path_full_values: dict) -> dict:
    """{local_path: tensor} of this rank's pieces of a {full_path: tensor} dict."""
    out = {}
    for path, decl in tree.paths(model_defs, is_leaf=is_decl):
        leaf = layout.local(path, decl, path_full_values[path]) if layout is not None else path_full_values[path]
        for sub, t in tree.paths({"x": leaf}):
            out[path + sub[1:]] = t
    return out


# ----------------------------------------------------------------------------- comm
def check_comm(rank, world):
    res = {}
    g = dist.group.WORLD
    n = world
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(3, 4 * n, 5, generator=gen)  # same on every rank
    w = [torch.randn(3, 4 * n, 5, generator=gen) for _ in range(n)]  # per-rank cotangent weights

    x = full.clone().requires_grad_()
    y = comm.copy_to_tp(x, g)
    (y * w[rank]).sum().backward()
    res["copy_to_tp fwd"] = close(y, full)
    res["copy_to_tp bwd"] = close(x.grad, sum(w))

    parts = [torch.randn(3, 4 * n, 5, generator=gen) for _ in range(n)]
    x = parts[rank].clone().requires_grad_()
    y = comm.reduce_from_tp(x, g)
    (y * w[0]).sum().backward()
    res["reduce_from_tp fwd"] = close(y, sum(parts))
    res["reduce_from_tp bwd"] = close(x.grad, w[0])

    shards = full.chunk(n, dim=1)
    x = shards[rank].clone().requires_grad_()
    y = comm.gather_from_tp(x, g, 1)
    (y * w[rank]).sum().backward()
    res["gather_from_tp fwd"] = close(y, full)
    res["gather_from_tp bwd"] = close(x.grad, w[rank].chunk(n, dim=1)[rank])

    x = full.clone().requires_grad_()
    y = comm.scatter_to_sequence(x, g, 1)
    (y * w[rank].chunk(n, dim=1)[rank]).sum().backward()
    res["scatter_to_sequence fwd"] = close(y, shards[rank])
    res["scatter_to_sequence bwd"] = close(x.grad, torch.cat([w[r].chunk(n, dim=1)[r] for r in range(n)], 1))

    for reduce_grad in (True, False):
        x = shards[rank].clone().requires_grad_()
        y = comm.gather_from_sequence(x, g, 1, reduce_grad=reduce_grad)
        (y * w[rank]).sum().backward()
        res[f"gather_from_sequence fwd rg={reduce_grad}"] = close(y, full)
        want = sum(w).chunk(n, dim=1)[rank] if reduce_grad else w[rank].chunk(n, dim=1)[rank]
        res[f"gather_from_sequence bwd rg={reduce_grad}"] = close(x.grad, want)

    x = parts[rank].clone().requires_grad_()
    y = comm.reduce_scatter_to_sequence(x, g, 1)
    (y * w[rank].chunk(n, dim=1)[rank]).sum().backward()
    res["reduce_scatter_to_sequence fwd"] = close(y, sum(parts).chunk(n, dim=1)[rank])
    res["reduce_scatter_to_sequence bwd"] = close(x.grad, torch.cat([w[r].chunk(n, dim=1)[r] for r in range(n)], 1))

    # all-to-all: scatter dim 1 (sequence), gather dim 2 (e.g. heads), as in Ulysses attention.
    xs = [torch.randn(2, 2 * n, 3, generator=gen) for _ in range(n)]
    x = xs[rank].clone().requires_grad_()
    y = comm.all_to_all(x, g, 1, 2)
    want = torch.cat([xs[r].chunk(n, dim=1)[rank] for r in range(n)], dim=2)
    cot = [torch.randn(2, 2, 3 * n, generator=gen) for _ in range(n)]
    (y * cot[rank]).sum().backward()
    res["all_to_all fwd"] = close(y, want)
    res["all_to_all bwd"] = close(x.grad, torch.cat([cot[r].chunk(n, dim=2)[rank] for r in range(n)], dim=1))
    return res


# ----------------------------------------------------------------------------- TP / SP / DP forward-backward
def check_model_equivalence(mesh, cfg_name, sequence_parallel, tag):
    """logits, loss and every gradient of the sharded run equal the single-process run."""
    from pmodel.parallel.data import DataParallel
    from pmodel.parallel.tensor import sync_replicated_grads
    res = {}
    cfg = CONFIGS[cfg_name]()
    plain = build(cfg)
    full = pmodel.init(plain, seed=3)
    batch = make_batch(cfg)
    ref_logits = plain.apply(full, batch["tokens"]).detach()
    ref_loss, ref_grads = full_grads(plain, full, batch)

    model = tensor_parallel(plain, mesh, sequence_parallel=sequence_parallel)
    params = pmodel.init(model, seed=3)
    layout = layout_of(model)
    want_vals = local_of(layout, model.defs, {p: t.detach() for p, t in tree.paths(full)})
    got_vals = dict(tree.paths(params))
    res[f"{tag} init == slice of full draw"] = (None if set(want_vals) == set(got_vals) and all(
        torch.equal(want_vals[k], got_vals[k]) for k in want_vals) else "local init differs from the sliced full draw")
    # Only local shards are kept: the storage of each leaf is its own numel.
    res[f"{tag} init keeps only shards"] = next((f"{k} storage {t.untyped_storage().nbytes()} > {t.nbytes}"
                                                 for k, t in got_vals.items()
                                                 if t.untyped_storage().nbytes() > t.nbytes), None)

    local = dp_slice(batch, mesh)
    logits = model.apply(params, local["tokens"]).detach()
    res[f"{tag} logits"] = close(logits, ref_logits.chunk(mesh.size("dp"), 0)[mesh.rank("dp")])

    dp = DataParallel(params, mesh, bucket_numel=1000, overlap=False)
    num = (batch["labels"] != -100).sum()
    loss, aux = model.loss(params, local, num_tokens=num)
    loss.backward()
    dp.finish()
    sync_replicated_grads(model, params)
    loss_total = comm.all_reduce(loss.detach(), mesh.group("dp"))
    res[f"{tag} loss"] = close(loss_total, ref_loss)
    want = local_of(layout, model.defs, ref_grads)
    bad = []
    for path, p in tree.paths(params):
        msg = close(p.grad, want[path]) if p.grad is not None else "no grad"
        if msg:
            bad.append(f"{path}: {msg}")
    res[f"{tag} grads ({len(want)} leaves)"] = "; ".join(bad) or None
    return res


# ----------------------------------------------------------------------------- entry
def run_world(rank, world, which):
    res = {}
    res.update(check_comm(rank, world))
    layouts = [("tp", dict(tp=world)), ("dp", dict(tp=1))]
    if world == 4:
        layouts.append(("tp2xdp2", dict(tp=2)))
    for lname, kw in layouts:
        mesh = Mesh.build(**kw)
        sps = (False, True) if mesh.size("tp") > 1 else (False,)
        for cfg_name in CONFIGS:
            for sp in sps:
                tag = f"[{lname}{world if lname != 'tp2xdp2' else ''} {cfg_name}{' sp' if sp else ''}]"
                res.update(check_model_equivalence(mesh, cfg_name, sp, tag))
        if mesh.size("dp") > 1:
            res.update(check_training(mesh, "gqa_nobias", f"[{lname} train gqa]"))
        if lname == "tp" and world == 2:
            res.update(check_lora_dropout(mesh, "gqa", False, "[lora tp2 gqa]"))
            res.update(check_lora_dropout(mesh, "mqa", True, "[lora tp2 mqa sp]"))
            res.update(check_lora_training(mesh, "[lora tp2 sp train]"))
        if lname == "tp2xdp2":
            res.update(check_lora_training(mesh, "[lora tp2xdp2 sp train]"))
    return res


# ----------------------------------------------------------------------------- training steps
STEPS, LR, CLIP = 5, 1e-2, 0.05  # CLIP small enough that every step clips (tests the global norm)


def _tx():
    from pmodel import optim
    return optim.adamw(LR, weight_decay=0.1)


def _batches(cfg, steps, B):
    return [make_batch(cfg, B=B, T=8, seed=100 + s) for s in range(steps)]


def reference_training(cfg_name, dp, micro=2):
    """Single-process adamw steps that sum the gradient in the data-parallel order (per dp chunk:
    micro-batches accumulated in turn; then the chunks summed in rank order). Adam divides by
    sqrt(v), which turns rounding differences in near-zero gradient components (e.g. the K bias
    along low RoPE frequencies, nearly invariant under softmax) into visible parameter differences,
    so the reference must add the same numbers in the same order to be comparable at 1e-5."""
    from pmodel import optim
    cfg = TRAIN_CONFIGS[cfg_name]()
    plain = build(cfg)
    params = pmodel.init(plain, seed=5)
    tx = _tx()
    state = tx.init(params)
    leaves = tree.leaves(params)
    for batch in _batches(cfg, STEPS, 8):
        total = (batch["labels"] != -100).sum()
        per_rank = []
        for r in range(dp):
            chunk = {k: v.chunk(dp, 0)[r] for k, v in batch.items()}
            for p in leaves:
                p.grad = None
            for i in range(micro):
                mb = {k: v.chunk(micro, 0)[i] for k, v in chunk.items()}
                loss, _ = plain.loss(params, mb, num_tokens=total)
                loss.backward()
            per_rank.append([p.grad.clone() for p in leaves])
        summed = [sum(gs[1:], gs[0].clone()) for gs in zip(*per_rank)]
        # Global-norm clip with the norm computed as the parallel code does (fp64 sum of squares):
        # Adam is scale invariant except through eps, which makes near-zero components sensitive
        # to the last bit of the clip coefficient.
        norm = torch.stack([g.double().pow(2).sum() for g in summed]).sum().sqrt().float()
        coef = torch.clamp(CLIP / (norm + 1e-6), max=1.0)
        assert coef < 1, "the test expects every step to clip"
        summed = [g * coef for g in summed]
        grads = tree.unflatten(summed, tree.structure(params))
        updates, state = tx.update(grads, state, params)
        optim.apply_updates(params, updates)
    return plain, {k: v.detach() for k, v in tree.paths(params)}


def parallel_training(mesh, cfg_name, *, sp, distributed, overlap, replica, micro=2):
    from pmodel.parallel.plan import parallelize
    cfg = TRAIN_CONFIGS[cfg_name]()
    plan = parallelize(build(cfg), _tx(), mesh, sequence_parallel=sp, distributed_optimizer=distributed,
                       overlap_grad_reduce=overlap, high_availability=replica, bucket_numel=700,
                       max_grad_norm=CLIP)
    params = plan.init(seed=5)
    state = plan.tx.init(params)
    dp = plan.data_parallel(params)  # the buckets plan.step uses for these params
    before = dp.reductions
    for batch in _batches(cfg, STEPS, 8):
        local = dp_slice(batch, mesh)
        mbs = [{k: v.chunk(micro, 0)[i] for k, v in local.items()} for i in range(micro)]
        params, state, metrics = plan.step(params, state, mbs)
    once = (dp.reductions - before) == STEPS * len(dp.buffers)
    from pmodel.parallel.memory import measured_bytes
    mem = measured_bytes(params, state, dp.buffers)
    return plan, {k: v.detach() for k, v in tree.paths(params)}, once, mem


def check_training(mesh, cfg_name, tag):
    """5 steps: plain adamw over dp equals the single-process run (dp-only meshes); the
    distributed optimizer (with and without overlap) equals plain adamw on the same mesh; replica
    equals distributed; overlap on equals overlap off bitwise; one reduction per bucket per step."""
    res = {}
    tp, dpn = mesh.size("tp"), mesh.size("dp")
    variants = [("plain", dict(distributed=False, overlap=False, replica=False)),
                ("overlap", dict(distributed=False, overlap=True, replica=False)),
                ("distributed", dict(distributed=True, overlap=False, replica=False)),
                ("distributed+overlap", dict(distributed=True, overlap=True, replica=False))]
    if dpn % 2 == 0:
        variants.append(("replica", dict(distributed=True, overlap=False, replica=True)))
    finals = {}
    for name, kw in variants:
        plan, got, once, mem = parallel_training(mesh, cfg_name, sp=tp > 1, **kw)
        finals[name] = got
        res[f"{tag} {name}: reduced once per step"] = None if once else "bucket reductions != buckets per step"
        res.update(check_memory(mem, TRAIN_CONFIGS[cfg_name](), mesh, kw, f"{tag} {name}"))

    def compare(a, b):
        bad = [f"{k}: {close(finals[a][k], finals[b][k])}" for k in finals[b] if close(finals[a][k], finals[b][k])]
        return "; ".join(bad) or None

    if tp == 1:
        _, ref = reference_training(cfg_name, dpn)
        bad = [f"{k}: {close(finals['plain'][k], ref[k])}" for k in ref if close(finals["plain"][k], ref[k])]
        res[f"{tag} plain dp adamw, {STEPS} steps == single process"] = "; ".join(bad) or None
    res[f"{tag} distributed optimizer == plain adamw ({STEPS} steps)"] = compare("distributed", "plain")
    res[f"{tag} distributed+overlap == plain adamw"] = compare("distributed+overlap", "plain")
    res[f"{tag} overlap on == off (bitwise)"] = None if all(
        torch.equal(finals["overlap"][k], finals["plain"][k]) for k in finals["plain"]) else "differs"
    if "replica" in finals:
        res[f"{tag} replica == distributed"] = compare("replica", "distributed")
    return res


# ----------------------------------------------------------------------------- memory accounting
MEMORY_RTOL = 0.05


def check_memory(mem, cfg, mesh, kw, tag):
    """``memory.estimate`` per-rank bytes for params, grads and optimizer state are within 5% of
    the bytes this rank's tensors hold after training (fp32 params and grads, adamw)."""
    from pmodel.parallel.memory import estimate
    layout = "replica" if kw["replica"] else "distributed" if kw["distributed"] else "plain"
    est = estimate(cfg, tp=mesh.size("tp"), pp=1, dp=mesh.size("dp"), layout=layout, param_bytes=4, grad_bytes=4)
    bad = []
    for k in ("params", "grads", "optimizer"):
        e, m = getattr(est, k), mem[k]
        if abs(e - m) > MEMORY_RTOL * m:
            bad.append(f"{k}: estimate {e:.0f} B vs measured {m} B ({(e - m) / m:+.1%})")
    return {f"{tag}: memory estimate within 5% of measured ({layout})": "; ".join(bad) or None}


# ----------------------------------------------------------------------------- LoRA under TP (+ DP)
LORA_DROPOUT, LORA_SEED = 0.1, 7


def lora_model(cfg, dropout=LORA_DROPOUT):
    """LoRA on every projection with a random (not zero) B, so every factor gets a gradient."""
    from pmodel import lora as L
    lm = L.lora(build(cfg), 4, 8, dropout=dropout, targets="all")
    return lm.replace(defs=tree.map(lambda n: n.replace(b=n.b.replace(init="normal", std=0.1)) if L.is_lora(n) else n,
                                    lm.defs, is_leaf=L.is_lora))


def check_lora_dropout(mesh, cfg_name, sp, tag):
    """LoRA with dropout (bound keys): loss and adapter gradients under TP equal single process —
    the column-parallel LoRA sees the full input and the row-parallel one slices the full mask."""
    from pmodel import lora as L
    from pmodel.parallel.tensor import sync_replicated_grads
    res = {}
    cfg = CONFIGS[cfg_name]()
    lm = lora_model(cfg)
    batch = make_batch(cfg)
    full = pmodel.init(lm, seed=3)
    ref_loss, _ = lm.loss(L.bind_dropout(full, seed=LORA_SEED, step=2), batch)
    ref_loss.backward()
    ref_grads = {p: (t.grad if t.grad is not None else torch.zeros_like(t)) for p, t in tree.paths(full)}
    model = tensor_parallel(lm, mesh, sequence_parallel=sp)
    params = pmodel.init(model, seed=3)
    loss, _ = model.loss(L.bind_dropout(params, seed=LORA_SEED, step=2), batch)
    loss.backward()
    sync_replicated_grads(model, params)
    res[f"{tag} loss with dropout"] = close(loss.detach(), ref_loss.detach())
    want = local_of(layout_of(model), model.defs, ref_grads)
    bad = [f"{p}: {close(t.grad, want[p]) if t.grad is not None else 'no grad'}" for p, t in tree.paths(params)
           if t.requires_grad and (t.grad is None or close(t.grad, want[p]))]
    n = sum(t.requires_grad for t in tree.leaves(params))
    res[f"{tag} adapter grads with dropout ({n} factors)"] = "; ".join(bad) or (None if n else "no trainable leaf")
    return res


# LoRA training compares parallel runs with the single process after a few steps of SGD with
# momentum, not Adam: Adam divides each element by its own RMS, so an element whose gradient is
# 1e-3 of the tensor's largest gets its fp32 rounding (~5e-7 of the largest, from the different
# summation order of the TP reductions) amplified to ~5e-4 of its update. Measured here: the
# step-0 adapter gradients under TP2+SP agree to 5e-7 (median elementwise 5e-7), yet after 3 adamw
# steps layer 1's q_proj factors differ by 1.6e-5 of their largest value. SGD keeps the update
# linear in the gradient, so the comparison stays at 1e-5 and still covers clipping, masking and
# the TP-aware norm; Adam is compared between parallel variants that sum in the same order.
LORA_STEPS, LORA_LR = 3, 1.0


def _lora_tx(kind):
    from pmodel import optim
    if kind == "sgd":
        return optim.sgd(LORA_LR, momentum=0.9, weight_decay=0.1)
    return _tx()


def dropout_step(step: int, rank: int, i: int, dp: int, micro: int) -> int:
    """The dropout key index ``parallelize``'s micro-batch hook gets for micro-batch ``i`` of dp
    rank ``rank`` in optimizer step ``step`` (global micro-batch ``i * dp + rank``, numbered over
    the run)."""
    return step * micro * dp + i * dp + rank


def bind_hook(params, index):
    """The LoRA micro-batch hook: fresh dropout keys per micro-batch, none for evaluation."""
    from pmodel import lora as L
    return L.bind_dropout(params, train=False) if index is None else L.bind_dropout(params, seed=LORA_SEED, step=index)


def lora_reference_training(cfg_name, dp, micro=2):
    """Single-process LoRA training (only adapters train, SGD with momentum), summing in the dp
    order and binding the same dropout keys per micro-batch as the parallel run.

    Returns ``{path: final - initial}`` for the adapter factors."""
    from pmodel import lora as L
    from pmodel import optim
    cfg = TRAIN_CONFIGS[cfg_name]()
    lm = lora_model(cfg)
    params = pmodel.init(lm, seed=5)
    start = {k: v.detach().clone() for k, v in tree.paths(params)}
    tx = optim.masked(_lora_tx("sgd"), optim.trainable_mask)
    state = tx.init(params)
    leaves = tree.leaves(params)
    live = [p for p in leaves if p.requires_grad]
    for s, batch in enumerate(_batches(cfg, LORA_STEPS, 8)):
        total = (batch["labels"] != -100).sum()
        per_rank = []
        for r in range(dp):
            chunk = {k: v.chunk(dp, 0)[r] for k, v in batch.items()}
            for p in live:
                p.grad = None
            for i in range(micro):
                mb = {k: v.chunk(micro, 0)[i] for k, v in chunk.items()}
                bound = L.bind_dropout(params, seed=LORA_SEED, step=dropout_step(s, r, i, dp, micro))
                loss, _ = lm.loss(bound, mb, num_tokens=total)
                loss.backward()
            per_rank.append([p.grad.clone() for p in live])
        summed = [sum(gs[1:], gs[0].clone()) for gs in zip(*per_rank)]
        norm = torch.stack([g.double().pow(2).sum() for g in summed]).sum().sqrt().float()
        coef = torch.clamp(CLIP / (norm + 1e-6), max=1.0)
        assert coef < 1, "the test expects every step to clip"
        it = iter(summed)
        grads = tree.unflatten([next(it) * coef if p.requires_grad else None for p in leaves], tree.structure(params))
        updates, state = tx.update(grads, state, params)
        optim.apply_updates(params, updates)
    return lm, {k: v.detach() - start[k] for k, v in tree.paths(params) if v.requires_grad}


def lora_parallel_training(mesh, lm, kind, *, distributed, micro=2):
    """The same steps through ``parallelize`` (SP on when tp > 1; dropout keys bound per
    micro-batch by the plan's hook). Returns ``(plan, start, final)``."""
    from pmodel.parallel.plan import parallelize
    # The plan keeps optimizer state only for trainable leaves (the adapters), with or without
    # the distributed optimizer.
    plan = parallelize(lm, _lora_tx(kind), mesh, sequence_parallel=mesh.size("tp") > 1,
                       distributed_optimizer=distributed, overlap_grad_reduce=distributed, bucket_numel=700,
                       max_grad_norm=CLIP, micro_batch_hook=bind_hook)
    params = plan.init(seed=5)
    start = {k: v.detach().clone() for k, v in tree.paths(params)}
    state = plan.tx.init(params)
    for batch in _batches(TRAIN_CONFIGS["gqa_nobias"](), LORA_STEPS, 8):
        local = dp_slice(batch, mesh)
        mbs = [{k: v.chunk(micro, 0)[i] for k, v in local.items()} for i in range(micro)]
        params, state, _ = plan.step(params, state, mbs)
    return plan, start, {k: v.detach() for k, v in tree.paths(params)}


def check_lora_training(mesh, tag):
    """LoRA training (dropout on, only adapters train, global-norm clip active) through
    ``parallelize``: SGD steps equal the single-process run (the adapters' changes, 1e-5 relative);
    frozen weights stay bitwise unchanged; with dp > 1 the distributed optimizer (with overlap)
    equals plain adamw on the same mesh."""
    res = {}
    lm, ref_delta = lora_reference_training("gqa_nobias", mesh.size("dp"))
    plan, start, got = lora_parallel_training(mesh, lm, "sgd", distributed=False)
    full_delta = {p: ref_delta.get(p, torch.zeros(d.shape)) for p, d in tree.paths(lm.defs, is_leaf=is_decl)}
    want = local_of(layout_of(plan.model), plan.model.defs, full_delta)
    trained = set(ref_delta)  # the adapter factors (same paths under TP)
    bad = [f"{k}: {close(got[k] - start[k], want[k])}" for k in trained if close(got[k] - start[k], want[k])]
    res[f"{tag} adapter updates after {LORA_STEPS} sgd steps == single process"] = "; ".join(bad) or None
    moved = [k for k in got if k not in trained and not torch.equal(got[k], start[k])]
    res[f"{tag} frozen weights unchanged"] = ", ".join(moved) or None
    res[f"{tag} every adapter moved"] = ", ".join(k for k in trained if torch.equal(got[k], start[k])) or None
    if mesh.size("dp") > 1:
        finals = {d: lora_parallel_training(mesh, lm, "adamw", distributed=d)[2] for d in (False, True)}
        bad = [f"{k}: {close(finals[True][k], finals[False][k])}" for k in finals[False]
               if close(finals[True][k], finals[False][k])]
        res[f"{tag} distributed+overlap adamw == plain adamw"] = "; ".join(bad) or None
    return res
