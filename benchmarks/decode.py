#!/usr/bin/env python
"""Decode throughput: pmodel vs transformers ``generate``, run alternately in one process.

    OMP_NUM_THREADS=1 python benchmarks/decode.py                       # all cases, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/decode.py --cases stories --rounds 7
    python benchmarks/decode.py --llama2c ~/src/llama2.c                 # also llama2.c's run.c

Cases:
  stories   the real stories260K (``../shared/data``), batch 1, greedy, 256 new tokens from BOS
  llama20m  a random ~20M-parameter LLaMA (hidden 384, 8 layers, 6 heads / 2 KV heads, FFN 1024,
            vocab 8192, untied), greedy, 128 new tokens after a 16-token prompt, batch 1 and 8
  prefill   the 20M model, one 512-token prompt: prompt tokens/s

Each round runs every contender once, in turn (pmodel fast step, pmodel generic step — the
model's forward with the cache —, transformers), so machine load hits all of them alike; the
report gives the median tokens/s per contender and the ratio to transformers. Both sides emit
exactly the same number of tokens (no EOS stop); the first round is a warm-up and is dropped.
``--llama2c DIR`` builds ``DIR/run.c`` with ``gcc -O3`` (one thread, no OpenMP) and runs
``stories260K.bin`` greedily for 256 tokens from BOS, reading its ``achieved tok/s`` line.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pmodel  # noqa: E402
from pmodel.inference import Decoder  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def _hf():
    import transformers
    return transformers


def _time(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def decode_case(name, model, params, hf, prompt: torch.Tensor, new: int, rounds: int) -> dict:
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    B = prompt.shape[0]
    runs = {
        "pmodel (fast step)": lambda: pmodel.generate(model, params, prompt, max_new_tokens=new),
        "pmodel (generic step)": lambda: pmodel.generate(model, params, prompt, max_new_tokens=new, fast=False),
        "transformers generate": lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt),
                                                     max_new_tokens=new, min_new_tokens=new, do_sample=False),
    }
    # the two sides agree on the tokens (greedy, fp32)
    a = runs["pmodel (fast step)"]()
    b = runs["transformers generate"]()
    same = a.tolist() == b.tolist()
    times = {k: [] for k in runs}
    with torch.no_grad():
        for r in range(rounds + 1):
            for k, f in runs.items():
                dt = _time(f)
                if r:
                    times[k].append(dt)
    out = {"case": name, "batch": B, "new_tokens": new, "same_tokens": same}
    for k, ts in times.items():
        out[k] = B * new / statistics.median(ts)
    return out


def prefill_case(model, params, hf, T: int, rounds: int) -> dict:
    ids = torch.randint(3, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))

    def ours():
        Decoder(model, params, batch=1, max_len=T + 1).prefill(ids)

    def theirs():
        hf(ids, use_cache=True)

    times = {"pmodel prefill": [], "transformers forward (use_cache)": []}
    with torch.no_grad():
        for r in range(rounds + 1):
            for k, f in zip(times, (ours, theirs)):
                dt = _time(f)
                if r:
                    times[k].append(dt)
    return {"case": "prefill", "batch": 1, "new_tokens": 0, "prompt": T,
            **{k: T / statistics.median(v) for k, v in times.items()}}


def llama20m(tmp: Path):
    tr = _hf()
    cfg = tr.LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    m = tr.LlamaForCausalLM(cfg).eval()
    m.save_pretrained(tmp)
    model, params = pmodel.load_hf(tmp)
    hf = tr.LlamaForCausalLM.from_pretrained(tmp).eval()
    n = sum(p.numel() for p in hf.parameters())
    return model, params, hf, n


def run_llama2c(d: Path, model_dir: Path) -> float:
    exe = Path("/tmp/pmodel_llama2c_run")
    subprocess.run(["gcc", "-O3", "-o", str(exe), str(d / "run.c"), "-lm"], check=True)
    bin_ = model_dir / "llama2c_original" / "stories260K.bin"
    tok = model_dir / "llama2c_original" / "tok512.bin"
    r = subprocess.run([str(exe), str(bin_), "-z", str(tok), "-t", "0.0", "-n", "257", "-i", ""],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    m = re.search(r"achieved tok/s: ([0-9.]+)", r.stdout + r.stderr)
    if not m:
        raise RuntimeError(f"run.c printed no tok/s: {r.stdout[-500:]} {r.stderr[-500:]}")
    return float(m.group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["stories", "llama20m", "prefill"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--llama2c", type=Path, help="a llama2.c checkout (its run.c is built with gcc -O3)")
    args = ap.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, transformers {_hf().__version__}")
    rows = []
    if "stories" in args.cases:
        path = SHARED / "models" / "stories260K"
        model, params = pmodel.load_hf(path)
        hf = _hf().AutoModelForCausalLM.from_pretrained(path).eval()
        rows.append(decode_case("stories260K", model, params, hf, torch.tensor([[1]]), 256, args.rounds))
        if args.llama2c:
            rows[-1]["llama2.c run.c"] = run_llama2c(args.llama2c, path)
    if "llama20m" in args.cases or "prefill" in args.cases:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            model, params, hf, n = llama20m(Path(tmp))
            print(f"# llama20m: {n / 1e6:.1f}M parameters")
            g = torch.Generator().manual_seed(1)
            if "llama20m" in args.cases:
                for B in (1, 8):
                    prompt = torch.randint(3, 8192, (B, 16), generator=g)
                    rows.append(decode_case(f"llama20m b{B}", model, params, hf, prompt, 128, args.rounds))
            if "prefill" in args.cases:
                rows.append(prefill_case(model, params, hf, 512, args.rounds))
    for r in rows:
        base = r.get("transformers generate") or r.get("transformers forward (use_cache)")
        cols = [f"{k}: {v:,.0f} tok/s ({v / base:.2f}x)" for k, v in r.items() if isinstance(v, float)]
        extra = "" if r.get("same_tokens", True) else "  [tokens differ]"
        print(f"{r['case']:>14}  " + " | ".join(cols) + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
