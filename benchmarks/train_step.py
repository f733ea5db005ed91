#!/usr/bin/env python
"""Training-step throughput and peak memory: pmodel vs Hugging Face ``LlamaForCausalLM``.

Both sides get the same Llama config and the same initial weights (pmodel's init, copied into
the HF model through the checkpoint name mapping), the same batch, and the same AdamW
(lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1 on the matrices of the linear layers only):
``torch.optim.AdamW`` with two parameter groups on the HF side, ``pmodel.optim.adamw`` on ours.
HF uses ``attn_implementation="sdpa"`` and its own loss (``labels=`` shifted inside); pmodel
uses ``model.loss`` with the default kernels (chunked fused linear + cross-entropy).

Throughput: the two steps alternate in one process (warm-up first), so machine noise hits both
alike; we report the median tokens/s of each and their ratio.
Memory: each side runs alone in a fresh subprocess; we report the peak RSS above the RSS right
after imports (so transformers' import cost is not counted against HF), after a few steps.

Usage::

    OMP_NUM_THREADS=2 python benchmarks/train_step.py --config b --rounds 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    # (a) small vocab: the decoder layers dominate
    "a": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, ffn_hidden_size=688, vocab_size=1000,
              seq=256, batch=4),
    # (b) 32k vocab: the [B*T, V] logits and cross-entropy dominate an unfused step
    "b": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, ffn_hidden_size=1376, vocab_size=32000,
              seq=256, batch=4),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    # VmHWM (this address space's high-water mark), not getrusage's ru_maxrss: Linux carries
    # ru_maxrss across fork + exec, so a child spawned by a big parent would report the
    # parent's size.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def build(name: str, seed: int = 0):
    import torch
    import pmodel
    from pmodel import optim, tree
    from pmodel.model import ModelConfig, build as build_model
    c = CONFIGS[name]
    cfg = ModelConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_layers"],
                      num_heads=c["num_heads"], num_kv_heads=c["num_kv_heads"], ffn_hidden_size=c["ffn_hidden_size"],
                      max_position_embeddings=c["seq"], norm_eps=1e-5)
    model = build_model(cfg, family="llama")
    params = pmodel.init(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, cfg.vocab_size, (c["batch"], c["seq"] + 1), generator=g)
    return torch, pmodel, optim, tree, model, params, x


def make_pmodel(name: str):
    torch, pmodel, optim, tree, model, params, x = build(name)
    tx = optim.adamw(1e-4, 0.9, 0.95, 1e-8, weight_decay=0.1)
    step_fn = pmodel.train.train_step(model, tx)
    state = [step_fn.init(params)]
    batch = {"tokens": x[:, :-1], "labels": x[:, 1:]}

    def step():
        _, state[0], m = step_fn(params, state[0], batch)
        return m["loss"]
    return step, x[:, :-1].numel(), (model, params)


def make_hf(name: str, weights_from=None):
    torch, pmodel, optim, tree, model, params, x = build(name)
    from transformers import LlamaConfig, LlamaForCausalLM
    from pmodel.checkpoint.hf import hf_state_dict
    fam = pmodel.families.get("llama")
    hf_cfg = LlamaConfig(**{k: v for k, v in fam.config_to_hf(model.config).items()
                            if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    sd = hf_state_dict(model, params if weights_from is None else weights_from)
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True, strict=False)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)  # real (non-meta) inv_freq buffer
    del params
    hf.train()
    mask = optim.weight_decay_mask(dict(hf.named_parameters()))
    decay = [p for n, p in hf.named_parameters() if "norm" not in n and "embed" not in n and p.dim() >= 2]
    rest = [p for n, p in hf.named_parameters() if not ("norm" not in n and "embed" not in n and p.dim() >= 2)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    del mask
    tokens = x[:, :-1].contiguous()
    labels = x[:, 1:].contiguous()

    def step():
        opt.zero_grad(set_to_none=True)
        # HF's own loss path (ForCausalLMLoss: logits.float(), cross-entropy); shift_labels
        # gives it the already-shifted targets so both sides predict the same B*T tokens.
        out = hf(input_ids=tokens, labels=labels, shift_labels=labels, use_cache=False)
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())
    return step, tokens.numel(), hf


def check_same_loss(name: str) -> tuple[float, float]:
    """First-step loss of both sides on the same weights (must agree to fp32 rounding)."""
    p_step, _, _ = make_pmodel(name)
    h_step, _, _ = make_hf(name)
    return p_step(), h_step()


def memory_child(side: str, name: str, steps: int) -> None:
    import torch  # noqa: F401
    import pmodel  # noqa: F401
    if side == "hf":
        import transformers  # noqa: F401
    base = rss_bytes()
    step, _, _ = (make_pmodel if side == "pmodel" else make_hf)(name)
    for _ in range(steps):
        step()
    print(json.dumps({"side": side, "peak_above_imports": peak_rss_bytes() - base, "peak_rss": peak_rss_bytes(),
                      "base": base}))


def measure_memory(side: str, name: str, steps: int = 3) -> dict:
    r = subprocess.run([sys.executable, __file__, "--config", name, "--memory-child", side, "--steps", str(steps)],
                       capture_output=True, text=True, env=os.environ.copy())
    if r.returncode:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="b")
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per side (alternating)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-child", choices=("pmodel", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.config, args.steps)
        return 0
    lp, lh = check_same_loss(args.config)
    print(f"config {args.config}: {CONFIGS[args.config]}  threads {args.threads}")
    print(f"first-step loss: pmodel {lp:.6f}  HF {lh:.6f}  (same weights, same batch)")
    p_step, ntok, _ = make_pmodel(args.config)
    h_step, _, _ = make_hf(args.config)
    for _ in range(args.warmup):
        p_step(), h_step()
    tp, th = [], []
    for r in range(args.rounds):
        for side, fn, acc in (("pmodel", p_step, tp), ("hf", h_step, th)) if r % 2 == 0 else \
                (("hf", h_step, th), ("pmodel", p_step, tp)):
            t0 = time.perf_counter()
            fn()
            acc.append(ntok / (time.perf_counter() - t0))
    mp, mh = statistics.median(tp), statistics.median(th)
    print(f"tokens/s median over {args.rounds} alternating steps: pmodel {mp:,.0f}  HF {mh:,.0f}  "
          f"ratio {mp / mh:.2f}x")
    res = {"config": args.config, "pmodel_tok_s": mp, "hf_tok_s": mh, "speed_ratio": mp / mh}
    if not args.skip_memory:
        a, b = measure_memory("pmodel", args.config), measure_memory("hf", args.config)
        print(f"peak RSS above imports (own subprocess, {3} steps): pmodel {a['peak_above_imports'] / 2**20:,.0f} MiB  "
              f"HF {b['peak_above_imports'] / 2**20:,.0f} MiB  ratio {a['peak_above_imports'] / b['peak_above_imports']:.2f}x")
        res.update(pmodel_mem=a["peak_above_imports"], hf_mem=b["peak_above_imports"],
                   mem_ratio=a["peak_above_imports"] / b["peak_above_imports"])
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
