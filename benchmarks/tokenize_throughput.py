#!/usr/bin/env python
"""Tokenizer throughput: pmodel's tokenizers beside the bare library they run on, same files,
same text, one thread, with the ids checked equal.

Corpus: about 1 MB of mixed text from ../shared/data (English wiki text, Chinese Alpaca
records, Python source from this repo, emoji / digit lines), cut into lines (documents).

    python benchmarks/tokenize_throughput.py [--repeat 3] [--mb 1.0]

Rows per tokenizer: ``encode_batch`` over the lines (what preprocess_data calls) and the bare
library's own batch call; ratio = ours / bare throughput, from CPU seconds (``process_time``,
so a shared machine's load does not enter the ratio) and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pmodel.data import load_tokenizer  # noqa: E402
from pmodel.data.tokenizers import BPERankTokenizer, HFTokenizer, SentencePieceTokenizer  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
NAMES = ["llama2", "llama3", "qwen", "mistral/tokenizer.model.v1", "chatglm3", "baichuan2", "internlm",
         "internlm2", "gpt2", "aquila"]


def corpus(mb: float) -> list[str]:
    en = (DATA / "pretrain" / "wiki_demo.txt").read_text(encoding="utf-8").splitlines()
    zh = [r["instruction"] + " " + r["output"] for r in
          json.loads((DATA / "sft" / "llamafactory" / "alpaca_zh_demo.json").read_text(encoding="utf-8"))]
    code = [l for f in sorted((ROOT / "pmodel").rglob("*.py")) for l in f.read_text(encoding="utf-8").splitlines()]
    emoji = [f"emoji 😀😃🎉👍🏽 line {i}: 3.14159 × {i} = {3.14159 * i:.3f} ＡＢＣ１２３ naïve café" for i in range(2000)]
    pools = [[l for l in p if l.strip()] for p in (en, zh, code, emoji)]
    out, size, i = [], 0, 0
    while size < mb * 1e6:
        for p in pools:
            line = p[i % len(p)]
            out.append(line)
            size += len(line.encode("utf-8")) + 1
        i += 1
    return out


def best(repeat, fn):
    """(best CPU seconds, its wall seconds, result)."""
    res, cpu_best, wall = None, float("inf"), 0.0
    for _ in range(repeat):
        c0, w0 = time.process_time(), time.perf_counter()
        res = fn()
        c, w = time.process_time() - c0, time.perf_counter() - w0
        if c < cpu_best:
            cpu_best, wall = c, w
    return cpu_best, wall, res


def bare(tok):
    """The library's own batch call on the same file, one thread."""
    if isinstance(tok, BPERankTokenizer):
        enc = tok._enc  # the tiktoken.Encoding built from the file (same ranks, regex, specials)
        import tiktoken

        bare_enc = tiktoken.Encoding(name="bare", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                     special_tokens=enc._special_tokens)
        return "tiktoken encode_ordinary_batch", lambda xs: bare_enc.encode_ordinary_batch(xs, num_threads=1)
    if isinstance(tok, SentencePieceTokenizer):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tok.path)
        return "sentencepiece encode(list)", lambda xs: sp.encode(xs, num_threads=1)
    if isinstance(tok, HFTokenizer):
        import tokenizers

        t = tok._tok if tok.path.endswith("tokenizer.json") else None
        if t is None:  # vocab.json + merges.txt, as transformers' GPT2 conversion builds it
            from tokenizers import decoders, models, pre_tokenizers

            folder = Path(tok.path).parent
            t = tokenizers.Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
            t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            t.decoder = decoders.ByteLevel()
        return ("HF tokenizers encode_batch_fast (TOKENIZERS_PARALLELISM="
                f"{os.environ.get('TOKENIZERS_PARALLELISM', 'default')})",
                lambda xs: [e.ids for e in t.encode_batch_fast(xs, add_special_tokens=False)])
    raise TypeError(type(tok))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mb", type=float, default=1.0)
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    if not DATA.exists():
        print("../shared/data not present", file=sys.stderr)
        return 1
    lines = corpus(args.mb)
    nbytes = sum(len(l.encode("utf-8")) + 1 for l in lines)
    load0 = os.getloadavg()[0]
    rows = []
    for name in args.only or NAMES:
        tok = load_tokenizer(DATA / "tokenizers" / name)
        what, fn = bare(tok)
        c_ours, w_ours, ours = best(args.repeat, lambda: tok.encode_batch(lines))
        c_bare, w_bare, theirs = best(args.repeat, lambda: fn(lines))
        same = [list(x) for x in ours] == [list(x) for x in theirs]
        n = sum(len(x) for x in ours)
        rows.append((name, type(tok).__name__, what, n, c_ours, c_bare, w_ours, w_bare, same))
    print(f"corpus: {len(lines)} lines, {nbytes / 1e6:.2f} MB (en/zh/code/emoji); machine: {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}; load average before/after: "
          f"{load0:.2f} / {os.getloadavg()[0]:.2f}")
    print("| tokenizer | pmodel backend | bare library call | tokens | ids equal | pmodel MB/CPU-s | bare MB/CPU-s "
          "| ratio (CPU) | ratio (wall) |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|")
    for name, kind, what, n, co, cb, wo, wb, same in rows:
        print(f"| {name} | {kind} | {what} | {n} | {'yes' if same else 'NO'} | {nbytes / 1e6 / co:.2f} | "
              f"{nbytes / 1e6 / cb:.2f} | {cb / co:.2f} | {wb / wo:.2f} |")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
