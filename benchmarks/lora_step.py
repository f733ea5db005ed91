#!/usr/bin/env python
"""LoRA train step: pmodel vs Hugging Face transformers + PEFT, same weights, same adapters.

Model: LLaMA, hidden 512, 8 layers, 8 heads / 4 KV heads, FFN 1376 (= 4*512*2/3 rounded up to a
multiple of 32), vocab 32000, untied output layer; LoRA r=8, alpha=16 on all seven projections;
batch 4 x seq 256; AdamW on the adapters only (both sides).

* Throughput: both sides live in this process and their steps alternate (pmodel, HF, pmodel,
  ...), so machine load drifts hit both alike; reported as the median tokens/s ratio.
* Peak memory: each side runs in its own subprocess (CPU: the kernel's peak resident set,
  reset with /proc/self/clear_refs once the model is loaded, over three train steps). Reported
  as the whole process's peak and as the peak above the loaded-model RSS (activations,
  gradients, optimizer state, allocator slack: what training adds on top of the weights).

The base checkpoint and the adapter are written once (HF ``save_pretrained`` / PEFT
``save_pretrained``) and both sides load them, so they start from identical numbers; the first
step's losses are compared as a check.

Run: ``OMP_NUM_THREADS=1 python benchmarks/lora_step.py`` (add ``--threads 2`` etc.).
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(a):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=a.layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max(512, a.seq),
        rms_norm_eps=1e-5, tie_word_embeddings=False)


def prepare(a, d: Path) -> None:
    """Write the random base model and a random (non-zero B) LoRA adapter."""
    import peft
    import transformers
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(hf_config(a))
    m.save_pretrained(d / "base", safe_serialization=True)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(m, cfg)
    pm.save_pretrained(d / "adapter")


def batch(a):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)  # (B, T)


class PmodelSide:
    name = "pmodel"

    def __init__(self, d: Path, tokens: torch.Tensor):
        import pmodel
        from pmodel import optim
        from pmodel.autodiff import value_and_grad
        from pmodel.checkpoint.peft import load_adapter
        model, params = pmodel.load_hf(d / "base")
        self.model, self.params = load_adapter(model, params, d / "adapter")
        self.optim = optim
        self.tx = optim.masked(optim.adamw(1e-4, weight_decay=0.0), optim.trainable_mask)
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
    name = "hf+peft"

    def __init__(self, d: Path, tokens: torch.Tensor):
        import peft
        import transformers
        base = transformers.LlamaForCausalLM.from_pretrained(d / "base", dtype=torch.float32,
                                                             attn_implementation="sdpa")
        self.model = peft.PeftModel.from_pretrained(base, d / "adapter", is_trainable=True)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)
        self.tokens = tokens

    def step(self) -> float:
        out = self.model(input_ids=self.tokens, labels=self.tokens)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())


SIDES = {"pmodel": PmodelSide, "hf": HFSide}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_worker(a) -> None:
    """One side in a fresh process: peak resident memory of two train steps."""
    torch.set_num_threads(a.threads)
    side = SIDES[a.memory_worker](Path(a.dir), batch(a))
    # Loading may peak higher than training (a checkpoint read beside the model); reset the
    # peak (VmHWM) to the current RSS once the weights are in place, then train. The optimizer
    # state is created during the first step on the HF side and at init on ours: both count.
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        side.step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"side": side.name, "rss_before_mib": rss_before / 1024, "peak_mib": peak / 1024,
                      "step_peak_mib": (peak - rss_before) / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per side (alternating)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
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
        sides = [PmodelSide(d, tokens), HFSide(d, tokens)]
        first = [s.step() for s in sides]  # warm-up, and the same-weights check
        if abs(first[0] - first[1]) > 1e-4 * abs(first[1]):
            raise SystemExit(f"first-step losses differ: pmodel {first[0]} vs HF+PEFT {first[1]}")
        times = {s.name: [] for s in sides}
        for _ in range(a.rounds):
            for s in sides:
                t0 = time.perf_counter()
                s.step()
                times[s.name].append(time.perf_counter() - t0)
        del sides
        tok = a.batch * a.seq
        tps = {k: tok / statistics.median(v) for k, v in times.items()}
        mem = {}
        for key in ("pmodel", "hf"):
            args = [sys.executable, __file__, "--memory-worker", key, "--dir", str(d)] + [
                f"--{k}={getattr(a, k)}" for k in ("hidden", "layers", "ffn", "vocab", "seq", "batch", "threads")]
            r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            mem[key] = json.loads(r.stdout.strip().splitlines()[-1])
    out = {
        "config": {k: getattr(a, k) for k in ("hidden", "layers", "ffn", "vocab", "seq", "batch", "rounds", "threads")},
        "first_step_loss": {"pmodel": first[0], "hf+peft": first[1]},
        "step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "throughput_ratio_pmodel_over_hf": round(tps["pmodel"] / tps["hf+peft"], 3),
        "memory_mib": mem,
        "step_peak_memory_ratio_pmodel_over_hf": round(mem["pmodel"]["step_peak_mib"] / mem["hf"]["step_peak_mib"], 3),
        "process_peak_memory_ratio_pmodel_over_hf": round(mem["pmodel"]["peak_mib"] / mem["hf"]["peak_mib"], 3),
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
