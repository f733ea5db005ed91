#!/usr/bin/env python
"""Plot a training run's JSON-lines metrics (written by ``pmodel.train.train`` /
``scripts/pretrain.py --metrics-file``) as a PNG: training loss (and eval loss) against
iteration, plus learning rate.

Usage: python scripts/plot_metrics.py metrics.jsonl [more.jsonl ...] -o loss.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read(path: Path) -> list[dict]:
    out = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"{path}: cannot read ({type(e).__name__}: {e})")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"{path}:{n}: not a JSON line ({e.msg})")
        # a loss record must say which step it belongs to (e.g. finetune.py's stdout uses "iter")
        if not isinstance(rec, dict) or (("loss" in rec or "eval_loss" in rec) and "step" not in rec):
            sys.exit(f"{path}:{n}: expected a JSON object with 'step' next to 'loss' / 'eval_loss' "
                     "(pmodel.train metrics), got " + line[:80])
        out.append(rec)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+", type=Path, help="JSON-lines metrics file(s)")
    ap.add_argument("-o", "--output", type=Path, default=Path("loss.png"), help="PNG to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_metrics needs matplotlib (pip install matplotlib, or the package's [test] extra)")

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for path in args.metrics:
        recs = read(path)
        tr = [r for r in recs if "loss" in r]
        ev = [r for r in recs if "eval_loss" in r]
        if not tr and not ev:
            sys.exit(f"{path}: no 'loss' or 'eval_loss' records")
        label = path.stem
        if tr:
            ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=f"{label} train")
            lr = [(r["step"], r["lr"]) for r in tr if r.get("lr") is not None]
            if lr:
                ax_lr.plot(*zip(*lr), label=label)
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o--", label=f"{label} eval")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(alpha=0.3)
    if args.title:
        ax.set_title(args.title)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
