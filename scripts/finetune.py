#!/usr/bin/env python
"""Supervised fine-tuning: full-parameter SFT or LoRA, on instruction data; and LoRA merging.

Train (loss on response tokens only: the chat template masks prompts with -100)::

    python scripts/finetune.py --load-hf models/base --data-path data/alpaca.json \\
        --prompt-type alpaca --seq-length 512 --micro-batch-size 4 --train-iters 200 \\
        --lr 1e-4 --lora-r 8 --lora-alpha 16 --lora-target-modules q_proj v_proj \\
        --save out/adapter

``--data-path`` is a raw ``.json`` / ``.jsonl`` file of alpaca or sharegpt records
(``--data-style``), tokenised here, or the ``--output-prefix`` of ``preprocess_data.py``
instruction output. Without ``--lora-r`` every parameter is trained and ``--save`` gets a full
HF checkpoint; with it only the adapters are trained and ``--save`` gets a PEFT adapter
(``adapter_config.json`` + ``adapter_model.safetensors``). ``--lora-load`` starts from an
existing adapter (its rank / alpha / targets win over the flags, which must then be omitted).

Merge an adapter into its base, producing a plain HF checkpoint::

    python scripts/finetune.py merge --load-hf models/base --lora-load out/adapter --save out/merged

Each training iteration prints one JSON line (``iter``, ``loss``, ``lr``, ``grad_norm``,
``tokens``); ``--eval-samples N`` prints ``eval`` lines with the response-token loss on the
first N examples before and after training.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pmodel  # noqa: E402
from pmodel import lora as L  # noqa: E402
from pmodel import optim, tree  # noqa: E402
from pmodel.autodiff import value_and_grad  # noqa: E402
from pmodel.checkpoint import peft as peft_io  # noqa: E402
from pmodel.data import (CollatorConfig, InstructionDataset, MicroBatchLoader, RecordError, collate,  # noqa: E402
                         encode_record, load_tokenizer, shift_example)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Plain-text files a merged / fully fine-tuned checkpoint carries over from its base.
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "vocab.json", "merges.txt")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-hf", required=True, help="base model: an HF checkpoint folder (safetensors)")
    p.add_argument("--save", required=True, help="output folder")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES),
                   help="parameter dtype (default: the checkpoint's)")


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "merge", "-h", "--help"):
        argv = ["train"] + argv  # `finetune.py --flags` means train, as in ModelLink
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune (full or LoRA)")
    _add_common(t)
    g = t.add_argument_group("data")
    g.add_argument("--data-path", required=True, help=".json/.jsonl records, or a preprocess_data prefix")
    g.add_argument("--data-style", default=None, choices=("alpaca", "sharegpt"),
                   help="raw record format (default: alpaca)")
    g.add_argument("--map-keys", default=None, help="JSON object of field renames for raw records")
    g.add_argument("--prompt-type", default=None,
                   help="chat template for raw records (default: the model family's)")
    g.add_argument("--tokenizer", default=None, help="tokenizer file/folder (default: --load-hf)")
    g.add_argument("--seq-length", type=int, default=512,
                   help="training positions per row at most: longer raw records lose later turns or are "
                        "skipped; a longer preprocessed example is refused")
    g.add_argument("--max-samples", type=int, default=None, help="use only the first N records")
    g = t.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--num-micro-batches", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", default="cosine", choices=optim.STYLES)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global-norm clip (0 = off)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute", action="store_true", help="full activation recompute, one block per region")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--save-interval", type=int, default=0, help="also save every N iterations (0 = end only)")
    g.add_argument("--eval-samples", type=int, default=0,
                   help="report the response-token loss on the first N examples before and after")
    g = t.add_argument_group("LoRA (ModelLink flag names)")
    g.add_argument("--lora-r", type=int, default=None, help="enable LoRA with this rank")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    g.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default 0)")
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="projection names (q_proj ... down_proj), ModelLink names (query_key_value, dense, "
                        "dense_h_to_4h, dense_4h_to_h), 'all', or one regex over module paths")
    g.add_argument("--lora-load", default=None, help="start from this PEFT adapter folder")

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base: a plain HF checkpoint")
    _add_common(m)
    m.add_argument("--lora-load", required=True, help="PEFT adapter folder")
    args = p.parse_args(argv)
    _check(p, args)
    return args


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Reject flag combinations that would otherwise be ignored."""
    if a.command != "train":
        return
    lora_flags = {"--lora-alpha": a.lora_alpha, "--lora-dropout": a.lora_dropout,
                  "--lora-target-modules": a.lora_target_modules}
    given = [k for k, v in lora_flags.items() if v is not None]
    if a.lora_load is not None and (a.lora_r is not None or given):
        p.error(f"--lora-load takes rank, alpha, dropout and targets from the adapter; drop "
                f"{['--lora-r'] * (a.lora_r is not None) + given}")
    if a.lora_load is None and a.lora_r is None and given:
        p.error(f"{given} need --lora-r (or --lora-load)")
    for name in ("micro_batch_size", "num_micro_batches", "train_iters", "seq_length", "log_interval"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.lora_dropout is not None and not 0.0 <= a.lora_dropout < 1.0:
        p.error("--lora-dropout must be in [0, 1)")
    for name in ("max_samples", "eval_samples", "save_interval", "clip_grad", "lr_warmup_iters"):
        v = getattr(a, name)
        if v is not None and v < (1 if name == "max_samples" else 0):
            p.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'max_samples' else 0}, got {v}")
    if a.lr_decay_style == "constant" and a.min_lr != 0.0:
        p.error("--min-lr is the floor of a decaying schedule; --lr-decay-style constant never uses it")
    if a.map_keys is not None:
        try:
            mk = json.loads(a.map_keys)
        except json.JSONDecodeError as e:
            p.error(f"--map-keys is not valid JSON: {e}")
        if not isinstance(mk, dict) or not all(isinstance(v, str) for v in mk.values()):
            p.error("--map-keys must be a JSON object of strings")
    raw = a.data_path.endswith((".json", ".jsonl"))
    if not raw:
        unused = {"--prompt-type": a.prompt_type, "--map-keys": a.map_keys, "--max-samples": a.max_samples,
                  "--data-style": a.data_style, "--tokenizer": a.tokenizer}
        bad = [k for k, v in unused.items() if v is not None]
        if bad:
            p.error(f"{bad} apply to raw .json/.jsonl records; {a.data_path} is a preprocessed prefix")


# ----------------------------------------------------------------------------- data
class _Examples:
    """Shifted examples in memory, with the ``sample(i)`` / ``len`` MicroBatchLoader reads."""

    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, i: int):
        return self.examples[i]


def _read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path}:{n}: invalid JSON ({e.msg})") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise SystemExit(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def load_examples(args, model) -> tuple[object, dict]:
    """The training examples and a summary of what was read / skipped."""
    if not args.data_path.endswith((".json", ".jsonl")):
        ds = InstructionDataset(args.data_path)
        # --seq-length bounds every row. Rows come whole from the preprocessed documents (a
        # packed document is one row), so a longer one is refused rather than trained at full
        # length. Training positions per document: sum over its sequences of (length - 1).
        pos = np.concatenate([[0], np.cumsum(ds.ids.sequence_lengths.astype(np.int64) - 1)])  # (S+1,)
        doc = ds.ids.document_indices  # (D+1,)
        per_doc = pos[doc[1:]] - pos[doc[:-1]]  # (D,)
        if per_doc.size and int(per_doc.max()) > args.seq_length:
            k = int(per_doc.argmax())
            raise SystemExit(f"{args.data_path}: example {k} has {int(per_doc[k])} training positions, more "
                             f"than --seq-length {args.seq_length}; pass --seq-length {int(per_doc.max())} or "
                             f"re-run preprocess_data.py with --seq-length {args.seq_length}")
        return ds, {"source": "preprocessed", "examples": len(ds)}
    tok = load_tokenizer(args.tokenizer or args.load_hf, vocab_size=model.config.vocab_size)
    template = args.prompt_type or pmodel.families.get(model.family).chat_template
    map_keys = json.loads(args.map_keys) if args.map_keys else {}
    records = _read_records(Path(args.data_path))
    if args.max_samples is not None:
        records = records[: args.max_samples]
    examples, skipped = [], {}
    for rec in records:
        try:
            r = encode_record(rec, tok, template, style=args.data_style or "alpaca", map_keys=map_keys,
                              max_len=args.seq_length + 1)  # +1: shifting drops one token
        except RecordError as e:
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
            continue
        if r is None:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            continue
        ex = shift_example(r.ids, r.labels)
        if ex["loss_mask"].sum() == 0:
            skipped["no_response_tokens"] = skipped.get("no_response_tokens", 0) + 1
            continue
        examples.append(ex)
    if not examples:
        raise SystemExit(f"{args.data_path}: no usable examples (skipped: {skipped})")
    return _Examples(examples), {"source": "raw", "template": template, "examples": len(examples),
                                 "skipped": skipped}


def batches(dataset, args, collator):
    """Endless micro-batch groups (one list per optimizer step), epoch after epoch in order."""
    n = len(dataset)
    gbs = args.micro_batch_size * args.num_micro_batches
    if n < gbs:
        raise SystemExit(f"{n} examples cannot fill one global batch of {gbs}")
    while True:
        yield from MicroBatchLoader(dataset, micro_batch_size=args.micro_batch_size,
                                    num_micro_batches=args.num_micro_batches, collator=collator)


# ----------------------------------------------------------------------------- model
def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def build(args):
    """``(model, params, is_lora)`` for the train command."""
    dtype = _DTYPES[args.dtype] if args.dtype else None
    model, params = pmodel.load_hf(args.load_hf, dtype=dtype)
    if args.lora_load is not None:
        # rank, alpha, dropout and targets come from the adapter's config
        model, params = peft_io.load_adapter(model, params, args.lora_load)
        return model, params, True
    if args.lora_r is not None:
        targets = args.lora_target_modules or ["q_proj", "v_proj"]
        targets = targets[0] if len(targets) == 1 else targets
        model = L.lora(model, args.lora_r, args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r,
                       args.lora_dropout or 0.0, targets)
        return model, L.adapt(model, params, seed=args.seed), True
    return model, params, False


def save(args, model, params, is_lora: bool, out: Path) -> None:
    if is_lora:
        peft_io.save_adapter(model, params, out, base_model_name_or_path=str(args.load_hf))
    else:
        pmodel.save_hf(model, params, out)
        _copy_tokenizer(Path(args.load_hf), out)


def _grads_add(acc, g):
    if acc is None:
        return g
    return tree.map(lambda a, b: None if a is None else a + b, acc, g, is_leaf=lambda x: x is None)


@torch.no_grad()
def eval_loss(model, params, examples: list, collator) -> float:
    """Mean response-token loss over ``examples`` (the sum over all tokens / their count)."""
    total, count = 0.0, 0
    p = L.bind_dropout(params, train=False) if "lora" in model.transforms else params
    for i in range(0, len(examples), 8):
        batch = collate(examples[i:i + 8], collator)
        _, aux = model.loss(p, batch)
        total += float(aux["loss_sum"])
        count += int(aux["num_tokens"])
    return total / max(count, 1)


def train(args) -> None:
    model, params, is_lora = build(args)
    if args.recompute:
        from pmodel.recompute import recompute
        model = recompute(model, "full", "uniform", 1)
    dataset, info = load_examples(args, model)
    print(json.dumps({"data": info}), flush=True)
    collator = CollatorConfig(seq_length=None, pad_to_multiple_of=8)
    n_train = sum(t.numel() for t in tree.leaves(params) if t.requires_grad)
    print(json.dumps({"model": model.family, "lora": is_lora, "trainable_params": n_train,
                      "total_params": sum(t.numel() for t in tree.leaves(params))}), flush=True)

    sched = optim.megatron(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.lr_warmup_iters,
                           decay_steps=args.train_iters if args.lr_decay_style in ("linear", "cosine") else None,
                           style=args.lr_decay_style)
    parts = [optim.clip_by_global_norm(args.clip_grad)] if args.clip_grad > 0 else []
    parts.append(optim.adamw(sched, args.adam_beta1, args.adam_beta2, args.adam_eps, args.weight_decay))
    # Frozen leaves (the LoRA base, everything but the adapters) get no optimizer state.
    tx = optim.masked(optim.chain(*parts), optim.trainable_mask)
    state = tx.init(params)
    dropout = is_lora and L.spec_of(model).dropout > 0

    eval_set = [dataset.sample(i) for i in range(min(args.eval_samples, len(dataset)))]
    if eval_set:
        print(json.dumps({"eval": "before", "iter": 0, "loss": eval_loss(model, params, eval_set, collator)}),
              flush=True)

    def loss_fn(p, batch, num_tokens):
        return model.loss(p, batch, num_tokens=num_tokens)[0]

    step_fn = value_and_grad(loss_fn)
    out = Path(args.save)
    stream = batches(dataset, args, collator)
    micro_step = 0
    for it in range(1, args.train_iters + 1):
        t0 = time.perf_counter()
        micro = next(stream)
        num_tokens = sum(int(b["loss_mask"].sum()) for b in micro)
        grads, loss_sum = None, 0.0
        for b in micro:
            p = L.bind_dropout(params, seed=args.seed, step=micro_step) if dropout else params
            micro_step += 1
            loss, g = step_fn(p, b, max(num_tokens, 1))
            loss_sum += float(loss)
            grads = _grads_add(grads, g)
        updates, state = tx.update(grads, state, params)
        optim.apply_updates(params, updates)
        if it % args.log_interval == 0 or it == args.train_iters:
            clip = optim.find_states(state, optim.ClipState)
            print(json.dumps({"iter": it, "loss": loss_sum, "lr": sched(it), "tokens": num_tokens,
                              "grad_norm": float(clip[0].norm) if clip else None,
                              "time_s": round(time.perf_counter() - t0, 4)}), flush=True)
        if args.save_interval and it % args.save_interval == 0 and it != args.train_iters:
            save(args, model, params, is_lora, out / f"iter_{it:07d}")

    if eval_set:
        print(json.dumps({"eval": "after", "iter": args.train_iters,
                          "loss": eval_loss(model, params, eval_set, collator)}), flush=True)
    save(args, model, params, is_lora, out)
    print(json.dumps({"saved": str(out), "kind": "peft_adapter" if is_lora else "hf_checkpoint"}), flush=True)


def merge(args) -> None:
    dtype = _DTYPES[args.dtype] if args.dtype else None
    model, params = pmodel.load_hf(args.load_hf, dtype=dtype)
    lm, lp = peft_io.load_adapter(model, params, args.lora_load)
    out = pmodel.save_hf(L.base_model(lm), L.merge(lp), args.save)
    _copy_tokenizer(Path(args.load_hf), out)
    print(json.dumps({"saved": str(out), "merged_modules": len(L.spec_of(lm).modules)}), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "merge":
        merge(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
