#!/usr/bin/env python
"""Supervised fine-tuning: full-parameter SFT or LoRA, on instruction data; and LoRA merging.

Train (loss on response tokens only: the chat template masks prompts with -100)::

    python scripts/finetune.py --load-hf models/base --data-path data/alpaca.json \\
        --prompt-type alpaca --seq-length 512 --micro-batch-size 4 --train-iters 200 \\
        --lr 1e-4 --lora-r 8 --lora-alpha 16 --lora-target-modules q_proj v_proj \\
        --save out/adapter

    # the same under TP2 (LoRA factors sharded with their base weights)
    python -m torch.distributed.run --nproc-per-node 2 scripts/finetune.py ... --tensor-model-parallel-size 2

``--data-path`` is a raw ``.json`` / ``.jsonl`` file of alpaca or sharegpt records
(``--data-style``), tokenised here, or the ``--output-prefix`` of ``preprocess_data.py``
instruction output. Without ``--lora-r`` every parameter is trained (bf16 / fp16 checkpoints keep
fp32 main weights in the optimizer) and ``--save`` gets a full HF checkpoint; with it only the
adapters are trained and ``--save`` gets a PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``). ``--lora-load`` starts from an existing adapter (its rank / alpha
/ targets win over the flags, which must then be omitted).

Training runs through the same step and loop as pretrain.py (:func:`pmodel.parallel.parallelize`,
:func:`pmodel.train.train`), so the parallel, precision and kernel flags mean the same; the
loop prints its ``iter ...`` lines and ``--eval-samples N`` adds JSON ``eval`` lines with the
response-token loss on the first N examples before and after training.

Merge an adapter into its base, producing a plain HF checkpoint::

    python scripts/finetune.py merge --load-hf models/base --lora-load out/adapter --save out/merged
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common as cli  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import pmodel  # noqa: E402
from pmodel import lora as L  # noqa: E402
from pmodel import tree  # noqa: E402
from pmodel.checkpoint import peft as peft_io  # noqa: E402
from pmodel import data as pdata  # noqa: E402
from pmodel.data import CollatorConfig, InstructionDataset, collate  # noqa: E402

PROG = "finetune.py"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Plain-text files a merged / fully fine-tuned checkpoint carries over from its base.
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "generation_config.json", "vocab.json", "merges.txt")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--load-hf", required=True, help="base model: an HF checkpoint folder (safetensors)")
    p.add_argument("--save", required=True, help="output folder")


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "merge", "-h", "--help"):
        argv = ["train"] + argv  # `finetune.py --flags` means train, as in ModelLink
    p = build_parser()
    args = p.parse_args(argv)
    _check(p, args)
    return args


def build_parser() -> argparse.ArgumentParser:
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
    g.add_argument("--seq-length", type=int, default=512,
                   help="training positions per row at most: longer raw records lose later turns or are "
                        "skipped; a longer preprocessed example is refused")
    g.add_argument("--max-samples", type=int, default=None, help="use only the first N records")
    g.add_argument("--eval-samples", type=int, default=0,
                   help="report the response-token loss on the first N examples before and after")
    g.add_argument("--recompute", action="store_true", help="full activation recompute, one block per region")
    cli.add_tokenizer_flags(t)
    cli.add_batch_flags(t, micro_default=4)
    cli.add_optimizer_flags(t, lr_default=1e-4, decay_style="cosine", weight_decay=0.0)
    cli.add_precision_flags(t)
    cli.add_parallel_flags(t)
    cli.add_kernel_flags(t)
    cli.add_megatron_flags(t)
    cli.add_moe_flags(t, architecture=False)
    cli.add_loop_flags(t, log_interval=1, checkpoints=False)
    cli.add_profile_flags(t)
    g = t.add_argument_group("output")
    g.add_argument("--save-interval", type=int, default=None,
                   help="also write the adapter / HF checkpoint to <save>/iter_N every N iterations")
    g = t.add_argument_group("LoRA (ModelLink flag names)")
    g.add_argument("--lora-r", type=int, default=None, help="enable LoRA with this rank")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    g.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default 0)")
    g.add_argument("--lora-target-modules", nargs="+", default=None,
                   help="projection names (q_proj ... down_proj), ModelLink names (query_key_value, dense, "
                        "dense_h_to_4h, dense_4h_to_h), 'all', or one regex over module paths")
    g.add_argument("--lora-load", default=None, help="start from this PEFT adapter folder")
    cli.add_debug_flag(t)

    m = sub.add_parser("merge", help="fold a LoRA adapter into its base: a plain HF checkpoint")
    _add_common(m)
    m.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="dtype (default: the checkpoint's)")
    m.add_argument("--lora-load", required=True, help="PEFT adapter folder")
    cli.add_debug_flag(m)
    return p


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
    if a.seq_length < 1:
        p.error("--seq-length must be >= 1")
    if a.lora_dropout is not None and not 0.0 <= a.lora_dropout < 1.0:
        p.error("--lora-dropout must be in [0, 1)")
    for name in ("max_samples", "eval_samples"):
        v = getattr(a, name)
        if v is not None and v < (1 if name == "max_samples" else 0):
            p.error(f"--{name.replace('_', '-')} must be >= {1 if name == 'max_samples' else 0}, got {v}")
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
                  "--data-style": a.data_style, "--tokenizer-model": a.tokenizer_model,
                  "--tokenizer-name-or-path": a.tokenizer_name_or_path, "--tokenizer-type": a.tokenizer_type}
        bad = [k for k, v in unused.items() if v is not None]
        if bad:
            p.error(f"{bad} apply to raw .json/.jsonl records; {a.data_path} is a preprocessed prefix")
    if a.enable_optimizer_state_local_copy:
        cli.refuse(PROG, "--enable-optimizer-state-local-copy serves the failure checkpoint, a training checkpoint; "
                         "finetune.py writes adapters / HF checkpoints only (--save is its output folder), so there is "
                         "no failure checkpoint (use pretrain.py for resumable runs)")
    cli.validate_common(a, PROG)


# ----------------------------------------------------------------------------- data
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
    tok = cli.load_tokenizer(args, default=args.load_hf, vocab_size=model.config.vocab_size,
                             slow=args.tokenizer_not_use_fast)
    template = args.prompt_type or pmodel.families.get(model.family).chat_template
    map_keys = json.loads(args.map_keys) if args.map_keys else {}
    try:
        records = pdata.read_records(args.data_path)
    except ValueError as e:
        cli.refuse(PROG, str(e))
    if args.max_samples is not None:
        records = records[: args.max_samples]
    rejects: list = []
    examples, skipped = pdata.encode_examples(records, tok, template, style=args.data_style or "alpaca",
                                              map_keys=map_keys, seq_length=args.seq_length, rejects=rejects)
    rejects_path = _write_rejects(args, rejects)
    if not len(examples):
        raise SystemExit(f"{PROG}: {args.data_path}: no usable examples (skipped: {skipped}"
                         + (f"; listed in {rejects_path}" if rejects_path else "") + ")")
    info = {"source": "raw", "template": template, "examples": len(examples), "skipped": skipped}
    if rejects_path:
        info["rejects"] = str(rejects_path)
    return examples, info


def _write_rejects(args, rejects: list) -> Path | None:
    """The skipped records, one JSON line each with file and line (``.jsonl``) or record number
    (``.json``, 1-based), reason and message, to ``<--save>/rejects.jsonl`` (lead rank only)."""
    if not rejects or int(os.environ.get("RANK", "0")) != 0:
        return None
    src = Path(args.data_path)
    lines = None
    if src.suffix == ".jsonl":
        lines = [n for n, ln in enumerate(src.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    out = Path(args.save) / "rejects.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for i, reason, msg in rejects:
            where = {"line": lines[i]} if lines is not None else {"record": i + 1}
            f.write(json.dumps({"file": str(src), **where, "reason": reason, "message": msg},
                               ensure_ascii=False) + "\n")
    return out


class _Cycle:
    """Sample ``i`` of an endless pass over ``dataset`` in order, epoch after epoch (so a resumed
    run continues from its consumed-samples position)."""

    def __init__(self, dataset):
        self.dataset, self.n = dataset, len(dataset)

    def sample(self, i: int):
        return self.dataset.sample(i % self.n)


# ----------------------------------------------------------------------------- model
def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def build(args):
    """``(model, params, is_lora)`` for the train command (full params, single-process layout)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    model, params = pmodel.load_hf(args.load_hf, dtype=dtype)
    model = _apply_moe_flags(args, model)
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


def _apply_moe_flags(args, model):
    """The MoE flags on the checkpoint's model: --num-experts / --moe-router-topk must agree with it
    (they are its architecture); the router losses and the capacity are training settings."""
    import dataclasses
    cfg = model.config
    over = cli.moe_overrides(args)
    if not over:
        return model
    bad = [f"{cli.FLAGS[k]} {over[k]} (checkpoint: {getattr(cfg, k)})" for k in ("num_experts", "moe_top_k")
           if k in over and over[k] != getattr(cfg, k)]
    if bad:
        cli.refuse(PROG, f"{', '.join(bad)}: the number of experts and the router's top-k are the checkpoint's "
                         f"architecture ({args.load_hf})")
    if not cfg.num_experts:
        cli.refuse(PROG, f"{' '.join(cli.FLAGS[k] for k in over if k in cli.FLAGS)}: {args.load_hf} is a dense model "
                         "(no experts)")
    try:
        return model.replace(config=dataclasses.replace(cfg, **over))
    except (TypeError, ValueError) as e:
        cli.refuse(PROG, cli.flag_message(str(e)))


def save(args, model, params, is_lora: bool, out: Path) -> None:
    if is_lora:
        peft_io.save_adapter(model, params, out, base_model_name_or_path=str(args.load_hf))
    else:
        pmodel.save_hf(model, params, out)
        _copy_tokenizer(Path(args.load_hf), out)


def train(args) -> None:
    launch = cli.Launch(args, PROG)
    model, full, is_lora = build(args)
    if args.recompute:
        model = pmodel.recompute(model, "full", "uniform", 1)
    model = model.replace(kernels=cli.kernels_of(args, launch.device, PROG))
    cfg = model.config
    lay = launch.layout(args, cfg)
    dataset, info = load_examples(args, model)
    launch.say(json.dumps({"data": info}))
    if not any(bool((np.asarray(dataset.sample(i)["labels"]) != pdata.IGNORE_INDEX).any())
               for i in range(len(dataset))):  # stops at the first example with a trained token
        cli.refuse(PROG, f"{args.data_path}: no tokens to train on: every label of the {len(dataset)} examples is "
                         "masked (prompt-only records? a template that masks the responses?)")
    if len(dataset) < lay["global_batch"]:
        cli.refuse(PROG, f"{len(dataset)} examples cannot fill one global batch of {lay['global_batch']}")
    collator = CollatorConfig(seq_length=None, pad_to_multiple_of=8)
    n_train = sum(t.numel() for t in tree.leaves(full) if t.requires_grad)
    launch.say(json.dumps({"model": model.family, "lora": is_lora, "trainable_params": n_train,
                           "total_params": sum(t.numel() for t in tree.leaves(full))}))
    hook = None
    if is_lora and L.spec_of(model).dropout > 0:
        # Dropout masks keyed by the global micro-batch number (the same under every layout);
        # evaluation binds none.
        def hook(p, i):
            return L.bind_dropout(p, train=False) if i is None else L.bind_dropout(p, seed=args.seed, step=i)
    tx, clip = cli.optimizer_of(args)
    launch.build_mesh(lay)
    try:
        plan = cli.build_plan(args, launch, model, tx, lay, max_grad_norm=clip, policy=cli.policy_of(args, cfg.dtype),
                              hook=hook)
        params = tree.map(lambda t: t.to(launch.device), plan.shard(full))
        template = full if launch.lead and launch.world > 1 else None
        del full
        opt_state = plan.tx.init(params)
        dev = launch.device

        def to_batch(mb):
            return {k: v.to(dev) for k, v in mb.items()}
        train_data = cli.loader(_Cycle(dataset), args, launch, lay, collator, to_batch, vocab_size=cfg.vocab_size)
        mesh = launch.mesh
        eval_set = [dataset.sample(i) for i in range(min(args.eval_samples, len(dataset)))]
        ep = mesh.size("ep")  # each data rank (dp x ep) scores its share
        mine = eval_set[mesh.rank("ep") + ep * mesh.rank("dp")::ep * mesh.size("dp")]

        def eval_batches():
            return [[to_batch(collate(mine[i:i + 8], collator))] for i in range(0, len(mine), 8)]
        if eval_set:
            launch.say(json.dumps({"eval": "before", "iter": 0, "loss": plan.evaluate(params, eval_batches())["loss"]}))
        out = Path(args.save)

        def snapshot(st, p, o):
            """--save-interval: the adapter / HF checkpoint at this iteration (the final one goes to --save)."""
            if st.step == args.train_iters:
                return None
            full = cli.gather(plan, p, template, out / ".gather")
            if launch.lead:
                save(args, model, full, is_lora, out / f"iter_{st.step:07d}")
            return out / f"iter_{st.step:07d}"
        metrics_save, args.save = args.save, None  # --save is the output folder, not a checkpoint root
        params, opt_state, state, _ = cli.run(args, launch, plan, params, opt_state, train_data, config=cfg,
                                              extra={"args": {k: v for k, v in vars(args).items()
                                                              if k != "notes"}}, save=snapshot if args.save_interval else None)
        args.save = metrics_save
        if eval_set:
            launch.say(json.dumps({"eval": "after", "iter": state.step,
                                   "loss": plan.evaluate(params, eval_batches())["loss"]}))
        final = cli.gather(plan, params, template, out / ".gather")
        if launch.lead:
            save(args, model, final, is_lora, out)
            launch.say(json.dumps({"saved": str(out), "kind": "peft_adapter" if is_lora else "hf_checkpoint"}))
    finally:
        launch.close()


def merge(args) -> None:
    save = Path(args.save).resolve()
    for flag in ("load_hf", "lora_load"):
        src = Path(getattr(args, flag)).resolve()
        if save == src or src in save.parents or save in src.parents:
            cli.refuse(PROG, f"--save {args.save} is (inside / above) --{flag.replace('_', '-')} "
                             f"{getattr(args, flag)}: the merge would overwrite its own input; save elsewhere")
    dtype = _DTYPES[args.dtype] if args.dtype else None
    model, params = pmodel.load_hf(args.load_hf, dtype=dtype)
    lm, lp = peft_io.load_adapter(model, params, args.lora_load)
    # Atomic: written into a hidden sibling folder, renamed into place once complete.
    tmp = save.with_name(f".tmp-{save.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        pmodel.save_hf(L.base_model(lm), L.merge(lp), tmp)
        _copy_tokenizer(Path(args.load_hf), tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = save.with_name(f".tmp-old-{save.name}")
    if save.exists():
        shutil.rmtree(old, ignore_errors=True)
        save.rename(old)
    tmp.rename(save)
    shutil.rmtree(old, ignore_errors=True)
    print(json.dumps({"saved": str(Path(args.save)), "merged_modules": len(L.spec_of(lm).modules)}), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "merge":
        merge(args)
    else:
        train(args)


if __name__ == "__main__":
    raise SystemExit(cli.run_main(main, PROG))
