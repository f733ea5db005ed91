#!/usr/bin/env python
"""Mixtral train step: pmodel vs transformers ``MixtralForCausalLM``, same weights, same batch.

Model (default): Mixtral with hidden 256, 4 layers, 8 heads / 4 KV heads, 8 experts of FFN 512,
top-2, vocab 1000, untied output layer, router aux loss on (``output_router_logits``, coefficient
0.02, so both losses include it); batch 4 x seq 256; AdamW (lr 1e-4, betas 0.9/0.95, no weight
decay, so no decay mask has to match) on every parameter, both sides.

* Same weights: transformers writes a random checkpoint once (``save_pretrained``) and pmodel
  loads it (``pmodel.load_hf``); the first step's losses are compared as a check.
* Throughput: both sides live in this process and their steps alternate (pmodel, HF, pmodel,
  ...) after one warm-up step each, so machine load drifts hit both alike; the median tokens/s
  of each side and their ratio are reported.
* Peak memory: each side runs in its own subprocess; the kernel's peak resident set (``VmHWM``)
  is reset (``/proc/self/clear_refs``) once the model is loaded, so loading spikes do not count,
  then three train steps run. Reported: the peak above the RSS right after ``import torch``
  (weights + gradients + Adam state + activations + allocator slack) and the peak above the
  loaded model (what training adds).
* transformers' experts: ``--hf-experts`` picks ``MixtralForCausalLM``'s
  ``experts_implementation`` (transformers 5: ``grouped_mm``, its default here, which runs
  ``torch._grouped_mm``; ``batched_mm``; ``eager``, the per-expert Python loop).
* pmodel's experts: the reference grouped matmul (one matmul per expert over its sorted block)
  or, with ``--pmodel-grouped-mm``, ``torch._grouped_mm`` (``Kernels.fused_moe``'s CUDA lowering,
  which runs on CPU too).

Run: ``OMP_NUM_THREADS=1 python benchmarks/moe_step.py`` (``--threads 2``, ``--profile``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

LR, BETAS, EPS = 1e-4, (0.9, 0.95), 1e-8


def hf_config(a):
    import transformers
    return transformers.MixtralConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max(512, a.seq), rms_norm_eps=1e-5,
        num_local_experts=a.experts, num_experts_per_tok=a.top_k, output_router_logits=True, router_aux_loss_coef=0.02,
        tie_word_embeddings=False, sliding_window=None)


def prepare(a, d: Path) -> None:
    import transformers
    torch.manual_seed(0)
    m = transformers.MixtralForCausalLM(hf_config(a))
    m.save_pretrained(d / "base", safe_serialization=True)


def batch(a):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)  # (B, T)


class PmodelSide:
    name = "pmodel"

    def __init__(self, d: Path, tokens: torch.Tensor, a):
        import pmodel
        from pmodel import optim
        from pmodel.autodiff import value_and_grad
        model, self.params = pmodel.load_hf(d / "base")
        if a.pmodel_grouped_mm:
            # Kernels.fused_moe's CUDA lowering (torch._grouped_mm) chosen explicitly; it runs on CPU too.
            from pmodel import ops
            model = model.replace(kernels=ops.Kernels(backend="cuda", fused_norm=False))
        self.model = model
        self.optim = optim
        self.tx = optim.adamw(LR, BETAS[0], BETAS[1], EPS, weight_decay=0.0)
        self.state = self.tx.init(self.params)
        labels = torch.full_like(tokens, -100)
        labels[:, :-1] = tokens[:, 1:]  # pmodel takes shifted labels; HF shifts inside its loss
        self.batch = {"tokens": tokens, "labels": labels}
        self.grad_fn = value_and_grad(lambda p, b: self.model.loss(p, b)[0])

    def step(self) -> float:
        loss, grads = self.grad_fn(self.params, self.batch)
        updates, self.state = self.tx.update(grads, self.state, self.params)
        self.optim.apply_updates(self.params, updates)
        return float(loss)


class HFSide:
    name = "hf"

    def __init__(self, d: Path, tokens: torch.Tensor, a):
        import transformers
        self.model = transformers.MixtralForCausalLM.from_pretrained(
            d / "base", dtype=torch.float32, attn_implementation="sdpa", experts_implementation=a.hf_experts)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
        self.tokens = tokens

    def step(self) -> float:
        out = self.model(input_ids=self.tokens, labels=self.tokens)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())


SIDES = {"pmodel": PmodelSide, "hf": HFSide}
FORWARD = ("hidden", "layers", "ffn", "experts", "top_k", "vocab", "seq", "batch", "threads", "hf_experts")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_worker(a) -> None:
    """One side in a fresh process: peak resident memory of three train steps."""
    torch.set_num_threads(a.threads)
    rss_imports = _status_kib("VmRSS")
    side = SIDES[a.memory_worker](Path(a.dir), batch(a), a)
    rss_loaded = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak := current RSS (loading spikes excluded)
    for _ in range(3):
        side.step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"side": side.name, "rss_imports_mib": rss_imports / 1024, "rss_loaded_mib": rss_loaded / 1024,
                      "peak_mib": peak / 1024, "peak_above_imports_mib": (peak - rss_imports) / 1024,
                      "step_peak_mib": (peak - rss_loaded) / 1024}))


def profile(sides, rows: int = 12) -> dict:
    from torch.profiler import ProfilerActivity, profile as prof
    out = {}
    for s in sides:
        with prof(activities=[ProfilerActivity.CPU]) as p:
            s.step()
        out[s.name] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", dest="top_k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6, help="timed steps per side (alternating)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--hf-experts", dest="hf_experts", default="grouped_mm", choices=["grouped_mm", "batched_mm", "eager"])
    p.add_argument("--pmodel-grouped-mm", dest="pmodel_grouped_mm", action="store_true")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per side")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-worker", choices=sorted(SIDES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.memory_worker:
        return memory_worker(a)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        prepare(a, d)
        tokens = batch(a)
        sides = [PmodelSide(d, tokens, a), HFSide(d, tokens, a)]
        first = [s.step() for s in sides]  # warm-up, and the same-weights check
        if abs(first[0] - first[1]) > 1e-4 * abs(first[1]):
            raise SystemExit(f"first-step losses differ: pmodel {first[0]} vs HF {first[1]}")
        times = {s.name: [] for s in sides}
        for _ in range(a.rounds):
            for s in sides:
                t0 = time.perf_counter()
                s.step()
                times[s.name].append(time.perf_counter() - t0)
        prof = profile(sides) if a.profile else None
        del sides
        tok = a.batch * a.seq
        tps = {k: tok / statistics.median(v) for k, v in times.items()}
        mem = {}
        if not a.skip_memory:
            for key in ("pmodel", "hf"):
                args = [sys.executable, __file__, "--memory-worker", key, "--dir", str(d)] + [
                    f"--{k.replace('_', '-')}={getattr(a, k)}" for k in FORWARD]
                if a.pmodel_grouped_mm:
                    args.append("--pmodel-grouped-mm")
                r = subprocess.run(args, capture_output=True, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
                if r.returncode:
                    raise SystemExit(r.stderr[-2000:])
                mem[key] = json.loads(r.stdout.strip().splitlines()[-1])
    out = {
        "config": {k: getattr(a, k) for k in FORWARD + ("rounds", "pmodel_grouped_mm")},
        "first_step_loss": {"pmodel": first[0], "hf": first[1]},
        "step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "throughput_ratio_pmodel_over_hf": round(tps["pmodel"] / tps["hf"], 3),
        "torch": torch.__version__,
    }
    if mem:
        out["memory_mib"] = mem
        out["peak_above_imports_ratio_pmodel_over_hf"] = round(
            mem["pmodel"]["peak_above_imports_mib"] / mem["hf"]["peak_above_imports_mib"], 3)
        out["step_peak_ratio_pmodel_over_hf"] = round(mem["pmodel"]["step_peak_mib"] / mem["hf"]["step_peak_mib"], 3)
    print(json.dumps(out, indent=2))
    if prof:
        for k, v in prof.items():
            print(f"\n=== {k}: one step, by self CPU time\n{v}")


if __name__ == "__main__":
    main()
