#!/usr/bin/env python
"""Throughput of preprocess_data (tokens/s) beside a plain HF `tokenizers` batch encode.

Input: ../shared/data/pretrain/tinystories_train_2MiB.txt (one document per non-blank line,
as preprocess_data reads .txt). Vocabulary: GPT-2 vocab.json + merges.txt on both sides.

    python benchmarks/preprocess.py [--repeat 3] [--workers 1 2]

Extra rows: the same pipeline with the Llama-3 rank file (our pure-Python BPE) beside
tiktoken's Rust encoder, for scale.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pmodel.data import PreprocessConfig, preprocess  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def best_of(repeat, fn):
    """(best wall seconds, CPU seconds of that run incl. worker processes, result)."""
    best, cpu, out = float("inf"), 0.0, None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), _cpu()
        out = fn()
        el, ce = time.perf_counter() - t0, _cpu() - c0
        if el < best:
            best, cpu = el, ce
    return best, cpu, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-llama3", action="store_true")
    args = p.parse_args()
    text_path = DATA / "pretrain" / "tinystories_train_2MiB.txt"
    gpt2 = DATA / "tokenizers" / "gpt2"
    if not text_path.exists():
        print("../shared/data not present", file=sys.stderr)
        return 1
    load0 = f"{os.getloadavg()[0]:.2f}"
    lines = [l for l in text_path.read_text(encoding="utf-8").splitlines() if l.strip()]
    rows = []

    def ours(tok_path, workers, kind="auto"):
        with tempfile.TemporaryDirectory() as d:
            cfg = PreprocessConfig(inputs=(str(text_path),), output_prefix=f"{d}/ts", tokenizer=str(tok_path),
                                   tokenizer_kind=kind, workers=workers, progress=False, log_interval=0)
            return preprocess(cfg).tokens

    for w in args.workers:
        sec, cpu, n = best_of(args.repeat, lambda: ours(gpt2, w))
        rows.append((f"preprocess_data, GPT-2 BPE (HF tokenizers backend), {w} worker(s)", n, sec, cpu))

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    tk = tokenizers.Tokenizer(models.BPE.from_file(str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    sec, cpu, n = best_of(args.repeat, lambda: sum(len(e.ids) for e in tk.encode_batch(lines, add_special_tokens=False)))
    rows.append(("baseline: HF tokenizers encode_batch, same vocab, one process "
                 f"(TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'default')})", n, sec, cpu))

    if not args.skip_llama3:
        l3 = DATA / "tokenizers" / "llama3" / "tokenizer.model"
        for w in args.workers:
            sec, cpu, n = best_of(args.repeat, lambda: ours(l3, w))
            rows.append((f"preprocess_data, Llama-3 ranks (pure-Python BPE), {w} worker(s)", n, sec, cpu))
        try:
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe

            from pmodel.data.tokenizers import LLAMA3_PATTERN

            enc = tiktoken.Encoding(name="l3", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(l3)),
                                    special_tokens={})
            sec, cpu, n = best_of(args.repeat, lambda: sum(len(x) for x in enc.encode_ordinary_batch(lines)))
            rows.append(("reference: tiktoken encode_ordinary_batch, Llama-3 ranks", n, sec, cpu))
        except ImportError:
            pass

    print(f"input: {text_path.name}, {len(lines)} non-blank lines, CPUs: {os.cpu_count()}, "
          f"load average before/after: {load0} / {os.getloadavg()[0]:.2f}")
    print("| what | tokens | wall s | tokens/s (wall) | CPU s | tokens per CPU-second |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, sec, cpu in rows:
        print(f"| {name} | {n} | {sec:.2f} | {n / sec:,.0f} | {cpu:.2f} | {n / max(cpu, 1e-9):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
