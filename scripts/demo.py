#!/usr/bin/env python
"""End-to-end demo on any machine: tokenizer -> pretraining -> checkpoint -> reload -> sample.

By default it needs nothing but this repository and Python: the corpus is the Python standard
library's own source code (``sysconfig.get_paths()["stdlib"]``), present on every machine.

1. trains a SentencePiece BPE tokenizer on the corpus (newlines kept as one ``↵`` piece, and
   whitespace preserved, so code indentation survives);
2. tokenizes it; a seeded random 5% of the files is held out (the tokenizer never sees it);
3. pretrains a small Llama (4 layers, hidden 128) with a progress bar;
4. saves a training checkpoint, reloads it into freshly initialised params and checks that the
   held-out loss is identical;
5. prints a generated sample, held-out loss / perplexity and a one-line summary.

Flags: ``--text-dir`` / ``--text-file`` use your own text instead; ``--hf-model DIR`` starts
from a Hugging Face checkpoint (and its tokenizer) and continues training it on the text.
Run with ``make demo`` (creates the venv) or ``python scripts/demo.py``.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pmodel  # noqa: E402
from pmodel import data as pdata, optim  # noqa: E402
from pmodel.checkpoint import sharded as ckpt  # noqa: E402
from pmodel.model import ModelConfig, build  # noqa: E402
from pmodel.train import LoopConfig, evaluate, train, train_step  # noqa: E402

NL = "\u21b5"  # "↵": stands for a newline inside SentencePiece sentences (which are lines)


def collect_text(args) -> tuple[list[str], str]:
    """Documents (one per file, or 200-line pieces when there are few files) and where they came from."""
    if args.text_file:
        files = [Path(f) for f in args.text_file]
        where = ", ".join(str(f) for f in files)
    else:
        d = Path(args.text_dir) if args.text_dir else Path(sysconfig.get_paths()["stdlib"])
        pattern = args.glob or ("*.py" if not args.text_dir else "*")
        files = sorted(p for p in d.rglob(pattern) if p.is_file() and "site-packages" not in p.parts)
        where = f"{d} ({pattern})"
    docs, total, skipped = [], 0, []
    for f in files:
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as e:
            skipped.append(f"{f}: {type(e).__name__}")
            continue
        if not t.strip():
            continue
        docs.append(t)
        total += len(t)
        if total >= args.max_chars:
            break
    if skipped:
        print(f"demo: skipped {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    if not docs:
        raise SystemExit(f"demo: no readable UTF-8 text found in {where}")
    if len(docs) < 20:
        # Too few files for a file-level held-out split: cut them into 200-line pieces.
        pieces = []
        for d in docs:
            lines = d.splitlines(keepends=True)
            pieces += ["".join(lines[i:i + 200]) for i in range(0, len(lines), 200)]
        where = f"{where} [{len(docs)} files cut into {len([p for p in pieces if p.strip()])} pieces]"
        docs = [p for p in pieces if p.strip()]
    else:
        where = f"{where} [{len(docs)} files]"
    return docs, where


class SPTokenizer:
    """SentencePiece with newlines mapped to ``↵`` (a user-defined piece)."""

    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text.replace("\n", NL))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids]).replace(NL, "\n")


class HFTok:
    """pmodel.data tokenizer with the same two methods."""

    def __init__(self, tok):
        self.tok, self.vocab_size = tok, tok.vocab_size
        self.bos_id, self.eos_id = tok.bos_id, tok.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def train_tokenizer(docs: list[str], out: Path, vocab_size: int, seed: int) -> SPTokenizer:
    import sentencepiece as spm
    # Sentences of at most ~2000 characters cut at line ends; newlines become "↵".
    sents = []
    for d in docs:
        buf = ""
        for line in d.splitlines(keepends=True):
            if len(buf) + len(line) > 2000 and buf:
                sents.append(buf.replace("\n", NL))
                buf = ""
            buf += line[:2000]
        if buf:
            sents.append(buf.replace("\n", NL))
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "tokenizer_corpus.txt"
    corpus.write_text("\n".join(sents), encoding="utf-8")
    spm.set_random_generator_seed(seed)  # the sentence sampling is seeded: same tokenizer every run
    if vocab_size < 300:
        raise SystemExit(f"demo: --vocab-size {vocab_size} is too small: byte fallback alone takes 256 pieces + 4 specials")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, user_defined_symbols=[NL], remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=8192, input_sentence_size=20000, shuffle_input_sentence=True, seed_sentencepiece_size=200000,
        num_threads=2, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    corpus.unlink()
    return SPTokenizer(out / "tokenizer.model")


def tokenize(docs: list[str], tok, eos: int | None) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d))
        if eos is not None and eos >= 0:
            ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def batches(stream: np.ndarray, *, batch: int, seq: int, seed: int, start_sample: int):
    """Training batches of random windows; sample i depends only on (seed, i): resumable."""
    n = len(stream) - seq - 1
    i = start_sample
    while True:
        starts = [int(np.random.default_rng([seed, i + k]).integers(0, n)) for k in range(batch)]
        w = torch.from_numpy(np.stack([stream[s:s + seq + 1] for s in starts]))  # (B, T+1)
        i += batch
        yield {"tokens": w[:, :-1], "labels": w[:, 1:]}


def held_out(stream: np.ndarray, *, batch: int, seq: int, max_batches: int) -> list[dict]:
    """Consecutive non-overlapping windows of the held-out stream."""
    n = min((len(stream) - 1) // seq, batch * max_batches)
    if n == 0:
        raise SystemExit(f"demo: held-out text has {len(stream)} tokens, fewer than one sequence of {seq}")
    w = torch.from_numpy(np.stack([stream[i * seq:i * seq + seq + 1] for i in range(n)]))
    return [{"tokens": w[s:s + batch, :-1], "labels": w[s:s + batch, 1:]} for s in range(0, n, batch)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--text-dir", help="train on the text files under this folder (default: Python's stdlib)")
    src.add_argument("--text-file", nargs="+", help="train on these text files")
    ap.add_argument("--glob", help="file pattern under the text folder (default *.py for the stdlib, else *)")
    ap.add_argument("--hf-model", help="start from this HF checkpoint folder (its tokenizer and weights)")
    ap.add_argument("--out", default="runs/demo", help="output folder (tokenizer, checkpoint, metrics); runs/ is git-ignored")
    ap.add_argument("--max-chars", type=int, default=4_000_000, help="read at most this much text")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="SentencePiece vocabulary size (default 2000; not with --hf-model, whose tokenizer is used)")
    ap.add_argument("--iters", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="peak lr (default 3e-3, or 3e-4 with --hf-model)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.glob and args.text_file:
        ap.error("--glob applies to a folder, not to --text-file")
    if args.vocab_size is not None and args.hf_model:
        ap.error("--vocab-size sizes the tokenizer the demo trains; --hf-model brings its own tokenizer")
    for flag in ("iters", "batch_size", "seq_length", "max_chars"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.lr is not None and args.lr <= 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs, where = collect_text(args)
    n_chars = sum(map(len, docs))
    print(f"[1/5] corpus: {n_chars / 1e6:.1f}M characters from {where}")
    # Hold out a seeded random 5% of the files (not the last ones in path order, which would be
    # one corner of the corpus) and fit the tokenizer on the training files only.
    order = np.random.default_rng(args.seed).permutation(len(docs))
    n_hold = max(1, len(docs) // 20) if len(docs) > 1 else 0
    hold_docs = [docs[i] for i in order[:n_hold]] or docs
    docs = [docs[i] for i in order[n_hold:]]
    if args.hf_model:
        tok = HFTok(pdata.load_tokenizer(args.hf_model))
        model, params = pmodel.load_hf(args.hf_model, dtype=torch.float32)
        cfg = model.config
        print(f"[2/5] tokenizer and weights from {args.hf_model}: vocab {tok.vocab_size}")
    else:
        t0 = time.perf_counter()
        tok = train_tokenizer(docs, out, args.vocab_size or 2000, args.seed)
        print(f"[2/5] trained a SentencePiece BPE tokenizer, vocab {tok.vocab_size}, in "
              f"{time.perf_counter() - t0:.0f}s -> {out / 'tokenizer.model'}")
        cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                          ffn_hidden_size=352, max_position_embeddings=args.seq_length, rope_theta=10000.0)
        model = build(cfg, family="llama")
        params = pmodel.init(model, seed=args.seed)
    train_ids = tokenize(docs, tok, tok.eos_id)
    hold_ids = tokenize(hold_docs, tok, tok.eos_id)
    if len(train_ids) <= args.seq_length + 1:
        raise SystemExit(f"demo: only {len(train_ids)} training tokens; need more than --seq-length {args.seq_length}")
    print(f"      tokens: {len(train_ids):,} train, {len(hold_ids):,} held out ({n_chars / (len(train_ids) + len(hold_ids)):.2f} chars/token)")
    eval_batches = held_out(hold_ids, batch=args.batch_size, seq=args.seq_length, max_batches=8)

    lr = args.lr or (3e-4 if args.hf_model else 3e-3)
    warm = max(1, args.iters // 10)
    tx = optim.adamw(optim.megatron(lr=lr, min_lr=lr / 10, warmup_steps=warm, decay_steps=max(args.iters, warm + 1),
                                    style="cosine"), b2=0.95, weight_decay=0.1)
    step = train_step(model, tx, max_grad_norm=1.0)
    opt_state = step.init(params)
    before = evaluate(model, params, eval_batches)
    print(f"[3/5] training {cfg.num_params() / 1e6:.2f}M-param Llama ({cfg.num_layers} layers, hidden {cfg.hidden_size}) "
          f"for {args.iters} iterations of {args.batch_size}x{args.seq_length} tokens; held-out loss before "
          f"{before['loss']:.3f}")
    ck_dir = out / "checkpoint"
    loop = LoopConfig(train_iters=args.iters, log_interval=max(1, args.iters // 5),
                      metrics_path=str(out / "metrics.jsonl"), progress=not args.no_progress)

    def save(st, p, o):
        return step.plan.save_checkpoint(ck_dir, st.step, p, o, config=cfg.to_dict(), keep_last=1,
                                         data={"consumed_samples": st.consumed_samples})
    t0 = time.perf_counter()
    data = lambda start: batches(train_ids, batch=args.batch_size, seq=args.seq_length, seed=args.seed, start_sample=start)
    params, opt_state, pos, hist = train(step, params, opt_state, data, loop=loop, save=save)
    train_s = time.perf_counter() - t0
    logs = [h for h in hist if "loss" in h]

    # Reload the checkpoint into freshly initialised params and check it reproduces the model.
    fresh = pmodel.init(model, seed=args.seed + 1) if not args.hf_model else pmodel.load_hf(args.hf_model)[1]
    fresh, _, man = ckpt.load(ck_dir, params=fresh, config=cfg.to_dict(), restore_rng_state=False)
    ev = evaluate(model, fresh, eval_batches)
    ev_live = evaluate(model, params, eval_batches)
    same = ev["loss"] == ev_live["loss"]
    print(f"[4/5] checkpoint {man['dir']} (iteration {man['step']}) reloaded: held-out loss "
          f"{ev['loss']:.4f} ({'identical' if same else 'DIFFERENT'} to the live model)")
    if not same:
        raise SystemExit("demo: the reloaded checkpoint does not reproduce the trained model")

    prompt = "def " if not args.hf_model else "Once upon a time"
    ids = ([tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else []) + tok.encode(prompt)
    gen = pmodel.generate(model, fresh, ids, max_new_tokens=120, temperature=0.8, top_k=40, seed=args.seed,
                          eos_id=tok.eos_id if tok.eos_id is not None and tok.eos_id >= 0 else None)
    text = tok.decode(gen[len(ids) - len(tok.encode(prompt)):].tolist())
    print("[5/5] sample (temperature 0.8, top-k 40):\n" + "-" * 60 + "\n" + text + "\n" + "-" * 60)
    tokens = args.iters * args.batch_size * args.seq_length
    tps = tokens / train_s
    print(f"demo: {args.iters} iters in {train_s:.0f}s ({tps:,.0f} tokens/s) | train loss {logs[0]['loss']:.3f} -> "
          f"{logs[-1]['loss']:.3f} | held-out loss {before['loss']:.3f} -> {ev['loss']:.3f} (ppl {ev['ppl']:.1f}) | "
          f"checkpoint reloaded OK | total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
