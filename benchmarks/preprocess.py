#!/usr/bin/env python
"""preprocess_data throughput with 1 and N workers beside the bare tokenizer library's batch
encode of the same documents, on a generated corpus.

Corpus: a ``.jsonl`` file of ``--mb`` MB (default 200) built by repeating the lines of
../shared/data/pretrain/tinystories_train_2MiB.txt and wiki_demo.txt with a line number in front
(so no two documents are equal), written once to a temporary folder.

    python benchmarks/preprocess.py [--mb 200] [--workers 1 2] [--tokenizer llama3] [--repeat 1]

Rows: wall and CPU seconds (worker processes included), MB/s; ratios: N workers vs 1 worker
(wall), and 1 worker vs the bare library (tokens per CPU-second; the bare row is the library's
batch call on the already-parsed texts, so the ratio is what parsing, BOS/EOS, the index and the
writes cost on top of tokenising).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pmodel.data import PreprocessConfig, load_tokenizer, preprocess  # noqa: E402

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


def make_corpus(path: Path, mb: float) -> int:
    lines = [l for f in ("tinystories_train_2MiB.txt", "wiki_demo.txt")
             for l in (DATA / "pretrain" / f).read_text(encoding="utf-8").splitlines() if l.strip()]
    size, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            row = json.dumps({"text": f"{i}: {lines[i % len(lines)]}"}, ensure_ascii=False) + "\n"
            f.write(row)
            size += len(row.encode("utf-8"))
            i += 1
    return i


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=float, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokenizer", default="llama3", help="a folder of ../shared/data/tokenizers")
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    if not DATA.exists():
        print("../shared/data not present", file=sys.stderr)
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok_path = DATA / "tokenizers" / args.tokenizer
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "corpus.jsonl"
        n_docs = make_corpus(src, args.mb)
        nbytes = src.stat().st_size
        for w in args.workers:
            def run(w=w):
                cfg = PreprocessConfig(inputs=(str(src),), output_prefix=f"{d}/out{w}", tokenizer=str(tok_path),
                                       workers=w, progress=False, log_interval=0)
                return preprocess(cfg).tokens
            sec, cpu, n = best_of(args.repeat, run)
            rows.append((f"preprocess_data, {w} worker(s)", n, sec, cpu))
        out = [Path(f"{d}/out{w}_text_document.bin").read_bytes() for w in args.workers]
        identical = all(o == out[0] for o in out)
        tok = load_tokenizer(tok_path)
        bos = list(tok.bos_ids) if tok.add_bos else []

        def read_parse_encode():
            texts = [json.loads(l)["text"] for l in src.read_text(encoding="utf-8").splitlines()]
            return sum(len(x) + len(bos) for x in tok.encode_batch(texts))
        sec, cpu, n = best_of(args.repeat, read_parse_encode)
        rows.append(("bare: read + json.loads + library batch encode, 1 process", n, sec, cpu))
        texts = [json.loads(l)["text"] for l in src.read_text(encoding="utf-8").splitlines()]
        sec, cpu, n = best_of(args.repeat, lambda: sum(len(x) + len(bos) for x in tok.encode_batch(texts)))
        rows.append(("bare: library batch encode of the parsed texts, 1 process", n, sec, cpu))
    print(f"corpus: {n_docs} documents, {nbytes / 1e6:.1f} MB .jsonl; tokenizer: {args.tokenizer}; machine: "
          f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; load average "
          f"before/after: {load0:.2f} / {os.getloadavg()[0]:.2f}; outputs identical across worker counts: {identical}")
    print("| what | tokens | wall s | MB/s (wall) | CPU s | tokens per CPU-second |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, n, sec, cpu in rows:
        print(f"| {name} | {n} | {sec:.2f} | {nbytes / 1e6 / sec:.1f} | {cpu:.2f} | {n / max(cpu, 1e-9):,.0f} |")
    one = rows[0]
    for name, n, sec, cpu in rows[1:-2]:
        print(f"{name} vs 1 worker: {one[2] / sec:.2f}x wall, {(n / cpu) / (one[1] / one[3]):.2f}x tokens per CPU-s")
    for bare in rows[-2:]:
        print(f"1 worker vs {bare[0]}, tokens per CPU-second: {(one[1] / one[3]) / (bare[1] / bare[3]):.2f}x")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
