#!/usr/bin/env python
"""Pretrain a decoder LLM with pmodel (Megatron / ModelLink flag names).

One process or many (``python -m torch.distributed.run --nproc-per-node N scripts/pretrain.py
...``): the same code path, :func:`pmodel.parallel.parallelize` for the step and
:func:`pmodel.train.train` for the loop. Examples::

    # a preset, Megatron-preprocessed data (scripts/preprocess_data.py), bf16
    python scripts/pretrain.py --model debug --data-path data/corpus_text_document \\
        --tokenizer-type PretrainedFromHF --tokenizer-name-or-path tok_dir --split 98,1,1 \\
        --seq-length 256 --micro-batch-size 4 --global-batch-size 16 --lr 3e-4 --min-lr 3e-5 \\
        --lr-warmup-iters 100 --lr-decay-style cosine --train-iters 2000 --bf16 \\
        --save ckpt --save-interval 500 --eval-interval 200 --eval-iters 10

    # continued pretraining from an HF checkpoint on 4 ranks: TP2 x PP2, ZeRO-1
    python -m torch.distributed.run --nproc-per-node 4 scripts/pretrain.py --load-hf hf_dir \\
        --mock-data --seq-length 32 --micro-batch-size 1 --global-batch-size 8 --train-iters 100 \\
        --lr 1e-4 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \\
        --use-distributed-optimizer --save ckpt --save-interval 50

Every accepted flag either takes effect or is refused with the reason. ``--load DIR`` resumes
params, optimizer state, step and data position from the latest checkpoint in DIR, saved under
any parallel layout (resharded on load); under the same layout the run continues bit-exactly.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common as cli  # noqa: E402

import pmodel  # noqa: E402
from pmodel import data as pdata  # noqa: E402
from pmodel.model import ModelConfig, build  # noqa: E402
from pmodel.resilience import TrainingInterrupted  # noqa: E402

PROG = "pretrain.py"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", help="a pmodel preset (see pmodel.families.names()); flags below override it")
    g.add_argument("--hf-config", help="build the architecture from an HF config.json (file or folder)")
    g.add_argument("--load-hf", help="start from the weights of an HF checkpoint folder (continued pretraining)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true", help="use --num-query-groups KV heads")
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int, help="model vocabulary (default: the tokenizer's)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=1,
                   help="pad the embedding rows to a multiple of this (Megatron default 128; here 1 = no padding)")
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--recompute-granularity", choices=("full", "selective"))
    g.add_argument("--recompute-method", choices=("uniform", "block"))
    g.add_argument("--recompute-num-layers", type=int)
    g = ap.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es), optionally weighted: 0.3 a 0.7 b")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true", help="synthetic random tokens (smoke tests, benchmarks)")
    cli.add_tokenizer_flags(ap)
    cli.add_batch_flags(ap)
    cli.add_optimizer_flags(ap)
    cli.add_precision_flags(ap)
    cli.add_parallel_flags(ap)
    cli.add_kernel_flags(ap)
    cli.add_loop_flags(ap)
    cli.add_profile_flags(ap)
    return ap


def validate(args) -> None:
    """Refuse flag combinations that could not take effect."""
    def no(msg):
        cli.refuse(PROG, msg)
    cli.validate_common(args, PROG)
    if sum(bool(x) for x in (args.model, args.hf_config, args.load_hf)) > 1:
        no("--model, --hf-config and --load-hf each pick an architecture; give one")
    if args.seq_length is not None and args.seq_length < 1:
        no(f"--seq-length must be >= 1, got {args.seq_length}")
    if args.num_query_groups is not None and not args.group_query_attention:
        no("--num-query-groups takes effect only with --group-query-attention")
    if args.group_query_attention and args.num_query_groups is None:
        no("--group-query-attention needs --num-query-groups")
    if args.data_path and args.mock_data:
        no("--data-path and --mock-data both give training data; choose one")
    if not args.data_path and not args.mock_data:
        no("no training data: give --data-path (preprocessed .bin/.idx prefixes) or --mock-data")
    if args.split != "969,30,1" and not args.data_path:
        no("--split applies to --data-path")
    if args.load_hf and any(getattr(args, f) is not None for f in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                                   "num_attention_heads", "vocab_size")):
        no("--load-hf takes the architecture from the checkpoint; drop the architecture flags")
    if args.recompute_granularity is None:
        if args.recompute_method is not None or args.recompute_num_layers is not None:
            no("--recompute-method / --recompute-num-layers need --recompute-granularity full")
    elif args.recompute_granularity == "selective":
        if args.recompute_method is not None or args.recompute_num_layers is not None:
            no("--recompute-method / --recompute-num-layers apply to --recompute-granularity full only "
               "(selective recomputes every layer's attention core)")
    elif args.recompute_method is None:
        no("--recompute-granularity full needs --recompute-method uniform or block")


def build_config(args, tokenizer) -> tuple[ModelConfig, str | None]:
    """The ModelConfig from --model / --hf-config / --load-hf / architecture flags (flags override)."""
    if args.model:
        family, cfg = pmodel.families.preset_config(args.model)
        base = cfg.to_dict()
    elif args.hf_config or args.load_hf:
        fam, cfg = pmodel.families.config_from_hf(args.hf_config or args.load_hf)
        family, base = fam.name, cfg.to_dict()
    else:
        missing = [f for f in ("num_layers", "hidden_size", "num_attention_heads") if getattr(args, f) is None]
        if missing:
            cli.refuse(PROG, "without --model, --hf-config or --load-hf give " +
                       ", ".join("--" + m.replace("_", "-") for m in missing))
        family, base = "llama", {"ffn_hidden_size": 4 * args.hidden_size}
    named = args.model or args.hf_config or args.load_hf
    over = {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size,
            "num_heads": args.num_attention_heads, "max_position_embeddings": args.max_position_embeddings}
    if args.group_query_attention:
        over["num_kv_heads"] = args.num_query_groups
    base.update({k: v for k, v in over.items() if v is not None})
    if args.num_attention_heads is not None or args.hidden_size is not None:
        base.pop("head_dim", None)  # re-derive from the new sizes
        if "num_kv_heads" not in over and named and args.num_attention_heads is not None:
            base["num_kv_heads"] = min(base.get("num_kv_heads") or args.num_attention_heads, args.num_attention_heads)
    if args.vocab_size is not None:
        base["vocab_size"] = args.vocab_size
    elif tokenizer is not None and not named:
        base["vocab_size"] = tokenizer.vocab_size
    elif "vocab_size" not in base:
        cli.refuse(PROG, "no vocabulary size: give --vocab-size or a tokenizer")
    if not args.load_hf:
        base["pad_vocab_to"] = args.make_vocab_size_divisible_by
    if args.max_position_embeddings is None and not named:
        base["max_position_embeddings"] = args.seq_length
    base["dtype"] = cli.dtype_of(args)
    try:
        cfg = ModelConfig.from_dict(base) if isinstance(base.get("dtype"), str) else ModelConfig(**base)
    except (TypeError, ValueError) as e:
        cli.refuse(PROG, f"invalid model configuration: {e}")
    if args.seq_length > cfg.max_position_embeddings:
        cli.refuse(PROG, f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{cfg.max_position_embeddings}")
    if tokenizer is not None:
        pdata.check_vocab_size(tokenizer, cfg.vocab_size)
    return cfg, family


class MockDataset:
    """Deterministic random tokens: sample ``i`` depends only on (seed, i)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab, self.L, self.seed = vocab_size, seq_length, seed

    def sample(self, i: int) -> dict:
        g = np.random.default_rng([self.seed, int(i)])
        s = g.integers(0, self.vocab, self.L + 1, dtype=np.int64)
        return {"tokens": s[:-1], "labels": s[1:], "loss_mask": np.ones(self.L, np.float32),
                "position_ids": np.arange(self.L, dtype=np.int64)}


def build_data(args, cfg, launch, lay):
    """``(train_data, eval_data)``: ``consumed_samples -> iterator`` of this rank's micro-batches and
    ``() -> iterable`` (or None)."""
    from pmodel.data import CollatorConfig, build_pretrain_datasets
    gbs, iters = lay["global_batch"], args.eval_iters or 100
    if args.mock_data:
        train_ds = MockDataset(cfg.vocab_size, args.seq_length, args.seed)
        valid_ds = MockDataset(cfg.vocab_size, args.seq_length, args.seed + 1)
    else:
        n_eval = ((args.train_iters // args.eval_interval + 1) * iters * gbs) if args.eval_interval else 0
        train_ds, valid_ds, _ = build_pretrain_datasets(
            args.data_path, split=args.split, seq_length=args.seq_length, seed=args.seed,
            num_samples=[args.train_iters * gbs, max(n_eval, 1), 1])
        if train_ds is None:
            cli.refuse(PROG, f"--split {args.split} leaves no training documents")
        if args.eval_interval and valid_ds is None:
            cli.refuse(PROG, f"--eval-interval given but --split {args.split} leaves no validation documents")
    dev = launch.device

    def to_batch(mb: dict) -> dict:
        # Pretraining rows are full, unpacked sequences: plain causal attention, so the dense
        # mask inputs the collator adds are dropped (they would force the masked attention path).
        return {k: mb[k].to(dev) for k in ("tokens", "labels", "loss_mask")}

    coll = CollatorConfig(seq_length=args.seq_length)
    # Samples past one epoch are valid indices (the dataset reshuffles per epoch), so the loader is
    # sized by what training needs, not by the dataset's epoch length.
    train_data = cli.loader(train_ds, args, launch, lay, coll, to_batch, num_samples=args.train_iters * gbs)
    eval_data = None
    if args.eval_interval:
        eval_loader = cli.loader(valid_ds, args, launch, lay, coll, to_batch)

        def eval_data():
            return eval_loader(0)
    return train_data, eval_data


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    launch = cli.Launch(args, PROG)
    try:
        tokenizer = cli.load_tokenizer(args)
    except (ValueError, FileNotFoundError) as e:
        cli.refuse(PROG, str(e))
    cfg, family = build_config(args, tokenizer)
    lay = launch.layout(args, cfg)
    kernels = cli.kernels_of(args, launch.device, PROG)
    torch.manual_seed(args.seed)
    model = build(cfg, kernels, family=family)
    if args.recompute_granularity is not None:
        model = pmodel.recompute(model, args.recompute_granularity, args.recompute_method,
                                 args.recompute_num_layers if args.recompute_granularity == "full" else None)
    tx, clip = cli.optimizer_of(args)
    launch.build_mesh(lay)
    try:
        plan = cli.build_plan(args, launch, model, tx, lay, max_grad_norm=clip, policy=cli.policy_of(args))
        if args.load_hf:
            _, full = pmodel.load_hf(args.load_hf, dtype=cfg.dtype)
            params = plan.shard(full)
            params = pmodel.tree.map(lambda t: t.to(launch.device), params)
            del full
        else:
            params = plan.init(args.seed, device=launch.device)
        opt_state = plan.tx.init(params)
        train_data, eval_data = build_data(args, cfg, launch, lay)
        extra = (f", pipeline {lay['schedule']} with {lay['microbatches']} micro-batches, stages {plan.pipe.stages}"
                 if plan.pipe is not None else "")
        launch.say(f"model: {model.family or 'custom'} {cfg.num_params() / 1e6:.2f}M params "
                   f"({cfg.num_params(embeddings=False) / 1e6:.2f}M non-embedding), {cfg.num_layers} layers, hidden "
                   f"{cfg.hidden_size}, heads {cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}, "
                   f"{str(cfg.dtype).removeprefix('torch.')} on {launch.device}; global batch {lay['global_batch']} x "
                   f"{args.seq_length} tokens")
        launch.say(f"parallel: world {launch.world} = pp {lay['pp']} x dp {lay['dp']} x tp {lay['tp']}{extra}; "
                   f"sequence parallel {args.sequence_parallel}, distributed optimizer "
                   f"{args.use_distributed_optimizer}, overlap {args.overlap_grad_reduce}, high availability "
                   f"{args.enable_high_availability}")
        t0 = time.perf_counter()
        try:
            _, _, state, hist = cli.run(args, launch, plan, params, opt_state, train_data, eval_data=eval_data,
                                        config=cfg, extra={"args": vars(args), "family": family})
        except TrainingInterrupted as e:
            # The process group may be broken (a dead peer): leave without tearing it down, which
            # could block; the launcher restarts the job from the failure checkpoint.
            print(f"{PROG}: rank {launch.rank}: {e}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        logs = [h for h in hist if "loss" in h]
        launch.say(f"done: {state.step} iterations, {state.consumed_samples} samples, final loss "
                   f"{logs[-1]['loss'] if logs else float('nan'):.4f}, {time.perf_counter() - t0:.1f}s")
    finally:
        launch.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
