#!/usr/bin/env python
"""Pretrain a decoder LLM with pmodel (Megatron / ModelLink flag names).

Examples::

    # a preset, Megatron-preprocessed data (scripts/preprocess_data.py), bf16
    python scripts/pretrain.py --model debug --data-path data/corpus_text_document \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --split 98,1,1 \\
        --seq-length 256 --micro-batch-size 4 --global-batch-size 16 --lr 3e-4 --min-lr 3e-5 \\
        --lr-warmup-iters 100 --lr-decay-style cosine --train-iters 2000 --bf16 \\
        --save ckpt --save-interval 500 --eval-interval 200 --eval-iters 10

    # architecture from flags (Llama layout), synthetic data for a smoke test
    python scripts/pretrain.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 \\
        --ffn-hidden-size 172 --vocab-size 512 --seq-length 32 --micro-batch-size 2 \\
        --global-batch-size 4 --lr 1e-3 --train-iters 20 --mock-data

Every accepted flag either takes effect or is refused with the reason. Resuming: ``--load DIR``
restores params, optimizer state, step, RNG states and the data position from the latest
checkpoint in DIR and continues bit-exactly (CPU fp32).

Where things are built: :func:`build_model` (model + params from flags), :func:`build_optimizer`
(optimizer + precision policy) and :func:`build_data` (iterators). Under ``torch.distributed.run``
(or with any parallel flag) :func:`run_parallel` trains instead: tensor / sequence / pipeline /
data parallel, the distributed optimizer, bf16 and per-rank checkpoints, e.g.::

    python -m torch.distributed.run --nproc-per-node 4 scripts/pretrain.py --model debug --mock-data \\
        --num-layers 4 --seq-length 32 --micro-batch-size 1 --global-batch-size 8 --train-iters 100 \\
        --lr 1e-3 --pipeline-model-parallel-size 2 --pipeline-schedule zero-bubble \\
        --use-distributed-optimizer --save ckpt --save-interval 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pmodel  # noqa: E402
from pmodel import data as pdata, optim  # noqa: E402
from pmodel.checkpoint import state as ckpt  # noqa: E402
from pmodel.checkpoint.distributed import load_sharded, save_sharded  # noqa: E402
from pmodel.model import ModelConfig, build  # noqa: E402
from pmodel.precision import LossScale, Policy, mixed_precision  # noqa: E402
from pmodel.train import LoopConfig, TrainState, train  # noqa: E402

# Megatron --tokenizer-type values -> pdata.load_tokenizer kinds.
TOKENIZER_TYPES = {
    "SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece", "HuggingFaceTokenizer": "hf", "PretrainedFromHF": "hf",
    "TikTokenizer": "tiktoken", "ByteTokenizer": "bytes",
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", help="a pmodel preset (see pmodel.families.names()); flags below override it")
    g.add_argument("--hf-config", help="build the architecture from an HF config.json (file or folder)")
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
    g = ap.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, help="default: --micro-batch-size (no accumulation)")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--lr-decay-style", default="linear", choices=optim.STYLES)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global-norm clipping; 0 disables")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g = ap.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, help="fp16 dynamic loss scale start (default 2**32)")
    g.add_argument("--loss-scale-window", type=int, help="fp16: clean steps before the scale grows (default 1000)")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="accumulate bf16/fp16 micro-batch gradients in fp32")
    g = ap.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es), optionally weighted: 0.3 a 0.7 b")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_TYPES))
    g.add_argument("--tokenizer-model", help="tokenizer file or folder")
    g.add_argument("--mock-data", action="store_true", help="synthetic random tokens (smoke tests, benchmarks)")
    g = ap.add_argument_group("checkpointing and logging")
    g.add_argument("--save", help="checkpoint root")
    g.add_argument("--load", help="resume from the latest checkpoint under this root")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int)
    g.add_argument("--eval-iters", type=int, help="batches per evaluation (needs --eval-interval; default 100)")
    g.add_argument("--metrics-file", help="JSON-lines metrics (default: <save>/metrics.jsonl when --save)")
    g.add_argument("--peak-tflops", type=float, help="device peak TFLOP/s, to report MFU")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = ap.add_argument_group("pipeline parallel and activation recompute")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layer-list", help="comma-separated layers per pipeline stage (uneven split), e.g. 1,3")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="layers per model chunk: enables the interleaved schedule's virtual stages")
    g.add_argument("--pipeline-schedule", choices=("1f1b", "interleaved", "zero-bubble"),
                   help="default: interleaved with virtual stages, else 1f1b")
    g.add_argument("--recompute-granularity", choices=("full", "selective"))
    g.add_argument("--recompute-method", choices=("uniform", "block"))
    g.add_argument("--recompute-num-layers", type=int)
    g = ap.add_argument_group("tensor / sequence / data parallel (launch with torchrun, one process per rank)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="keep activations sharded on the sequence between TP regions (needs TP > 1)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="ZeRO-1: fp32 main params and Adam moments sharded over the data-parallel ranks "
                        "(with data-parallel size 1 it runs but warns that nothing is sharded)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="start each gradient bucket's data-parallel reduction during backward (needs dp > 1)")
    g.add_argument("--enable-high-availability", action="store_true",
                   help="replica optimizer: each optimizer shard held by two dp ranks (needs "
                        "--use-distributed-optimizer and an even data-parallel size)")
    return ap


def validate(args) -> None:
    """Refuse flag combinations that could not take effect."""
    def no(msg):
        raise SystemExit(f"pretrain.py: {msg}")
    if args.model and args.hf_config:
        no("--model and --hf-config both pick an architecture; give one")
    if args.bf16 and args.fp16:
        no("--bf16 and --fp16 are exclusive")
    for flag in ("seq_length", "micro_batch_size", "global_batch_size", "log_interval"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            no(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.clip_grad < 0:
        no(f"--clip-grad must be >= 0 (0 disables clipping), got {args.clip_grad}")
    if args.eval_iters is not None and not args.eval_interval:
        no("--eval-iters sets the batches per evaluation; without --eval-interval nothing is evaluated")
    if args.lr_decay_iters is not None and args.lr_decay_style not in ("linear", "cosine"):
        no(f"--lr-decay-iters: --lr-decay-style {args.lr_decay_style} has no decay length (only linear and cosine do)")
    if args.lr_decay_style == "constant" and args.min_lr != 0.0:
        no("--min-lr is the floor of a decaying schedule; --lr-decay-style constant never uses it")
    if args.tokenizer_type == "ByteTokenizer" and args.tokenizer_model:
        no(f"--tokenizer-type ByteTokenizer reads no file; drop --tokenizer-model {args.tokenizer_model} "
           "or pick the type that reads it")
    if (args.initial_loss_scale is not None or args.loss_scale_window is not None) and not args.fp16:
        no("--initial-loss-scale / --loss-scale-window need --fp16 (bf16 and fp32 train without loss scaling)")
    if args.accumulate_allreduce_grads_in_fp32 and not (args.bf16 or args.fp16):
        no("--accumulate-allreduce-grads-in-fp32 needs --bf16 or --fp16 (fp32 gradients already are fp32)")
    if args.num_query_groups is not None and not args.group_query_attention:
        no("--num-query-groups takes effect only with --group-query-attention")
    if args.group_query_attention and args.num_query_groups is None:
        no("--group-query-attention needs --num-query-groups")
    gbs = args.global_batch_size or args.micro_batch_size
    if gbs % args.micro_batch_size:
        no(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {args.micro_batch_size}")
    if args.save_interval is not None and not args.save:
        no("--save-interval needs --save")
    if args.data_path and args.mock_data:
        no("--data-path and --mock-data both give training data; choose one")
    if not args.data_path and not args.mock_data:
        no("no training data: give --data-path (preprocessed .bin/.idx prefixes) or --mock-data")
    if args.split != "969,30,1" and not args.data_path:
        no("--split applies to --data-path")
    if args.tokenizer_type and not args.tokenizer_model and TOKENIZER_TYPES[args.tokenizer_type] != "bytes":
        no(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-model")
    if args.lr_decay_style in ("linear", "cosine") and (args.lr_decay_iters or args.train_iters) <= args.lr_warmup_iters:
        no(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay length "
           f"{args.lr_decay_iters or args.train_iters} for --lr-decay-style {args.lr_decay_style}")
    validate_pipeline_recompute(args, no)
    validate_parallel(args, no)


def parallel_requested(args) -> bool:
    """Multi-process training: launched with several ranks or asked for by a parallel flag."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.tensor_model_parallel_size != 1
            or args.pipeline_model_parallel_size != 1 or args.sequence_parallel
            or args.use_distributed_optimizer or args.overlap_grad_reduce or args.enable_high_availability)


def validate_parallel(args, no) -> None:
    """Tensor / pipeline / data parallel flags: each takes effect (:func:`run_parallel`) or is refused
    here or in :func:`parallel_layout` with the reason (sizes that need the model config or the world size)."""
    tp = args.tensor_model_parallel_size
    if tp < 1:
        no(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if args.sequence_parallel and tp == 1:
        no("--sequence-parallel needs --tensor-model-parallel-size > 1 (it shards the sequence over the TP group)")
    if args.enable_high_availability and not args.use_distributed_optimizer:
        no("--enable-high-availability (replica optimizer) needs --use-distributed-optimizer")
    if not parallel_requested(args):
        return
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        no("tensor / pipeline / data parallel flags need one process per rank: launch with torchrun, e.g. "
           "python -m torch.distributed.run --nproc-per-node 2 scripts/pretrain.py ...")
    unsupported = [flag for flag, on in (("--eval-interval", args.eval_interval), ("--fp16", args.fp16),
                                         ("--peak-tflops", args.peak_tflops)) if on]
    if unsupported:
        no(f"{', '.join(unsupported)}: not wired into multi-process training yet (its loop logs training "
           "loss only, has no loss scaling agreed across ranks for fp16, and reports no MFU); run "
           "single-process for these")
    if args.accumulate_allreduce_grads_in_fp32:
        no("--accumulate-allreduce-grads-in-fp32: multi-process gradients accumulate in the parameters' dtype "
           "in the data-parallel buckets; fp32 buckets are not wired yet")
    if args.pipeline_model_parallel_size > 1 and args.overlap_grad_reduce:
        no("--overlap-grad-reduce with --pipeline-model-parallel-size > 1: the pipeline interleaves the "
           "micro-batches' backwards, so a bucket's gradients are complete only after the schedule ends; "
           "the overlapped reduction is wired for pp = 1 only")
    if torch.device(args.device).type != "cpu":
        no(f"--device {args.device}: multi-process training from this script runs on CPU (gloo) only so far")


def validate_pipeline_recompute(args, no) -> None:
    """Pipeline / recompute flags: each takes effect or is refused with the reason."""
    pp = args.pipeline_model_parallel_size
    if pp < 1:
        no(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if pp == 1:
        for flag, val in (("--num-layer-list", args.num_layer_list),
                          ("--num-layers-per-virtual-pipeline-stage", args.num_layers_per_virtual_pipeline_stage),
                          ("--pipeline-schedule", args.pipeline_schedule)):
            if val is not None:
                no(f"{flag} needs --pipeline-model-parallel-size > 1")
    else:
        # Flag-only checks here; the split against the model's layer count and the micro-batch
        # count are checked by pipeline_layout() once the config and world size are known.
        if args.num_layer_list is not None:
            try:
                lst = [int(x) for x in args.num_layer_list.split(",")]
            except ValueError:
                no(f"--num-layer-list {args.num_layer_list!r}: expected comma-separated integers, e.g. 1,3")
            if len(lst) != pp:
                no(f"--num-layer-list {args.num_layer_list} has {len(lst)} entries; expected one per pipeline "
                   f"stage (--pipeline-model-parallel-size {pp})")
            if args.num_layers_per_virtual_pipeline_stage is not None:
                no("--num-layer-list and --num-layers-per-virtual-pipeline-stage: a virtual stage size is one "
                   "number for every rank, an uneven split is not; give one of them")
        v = args.num_layers_per_virtual_pipeline_stage
        if v is not None and v < 1:
            no(f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {v}")
        if args.pipeline_schedule == "interleaved" and v is None:
            no("--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage (the model chunks "
               "each rank interleaves)")
        if args.pipeline_schedule in ("1f1b", "zero-bubble") and v is not None:
            no(f"--num-layers-per-virtual-pipeline-stage makes virtual stages, which only the interleaved "
               f"schedule runs; --pipeline-schedule {args.pipeline_schedule} would ignore them")
    if args.recompute_granularity is None:
        if args.recompute_method is not None or args.recompute_num_layers is not None:
            no("--recompute-method / --recompute-num-layers need --recompute-granularity full")
    elif args.recompute_granularity == "selective":
        if args.recompute_method is not None or args.recompute_num_layers is not None:
            no("--recompute-method / --recompute-num-layers apply to --recompute-granularity full only "
               "(selective recomputes every layer's attention core)")
    elif args.recompute_method is None:
        no("--recompute-granularity full needs --recompute-method uniform or block")


def _eval_iters(args) -> int:
    # None when the flag is left out, so validate() can refuse it without --eval-interval
    return 100 if args.eval_iters is None else args.eval_iters


def load_tokenizer(args):
    if not args.tokenizer_model and not args.tokenizer_type:
        return None
    kind = TOKENIZER_TYPES[args.tokenizer_type] if args.tokenizer_type else "auto"
    return pdata.load_tokenizer(args.tokenizer_model, kind=kind)


def build_config(args, tokenizer) -> tuple[ModelConfig, str | None]:
    """The ModelConfig from --model / --hf-config / architecture flags (flags override)."""
    family = None
    if args.model:
        family, cfg = pmodel.families.preset_config(args.model)
        base = cfg.to_dict()
    elif args.hf_config:
        fam, cfg = pmodel.families.config_from_hf(args.hf_config)
        family, base = fam.name, cfg.to_dict()
    else:
        missing = [f for f in ("num_layers", "hidden_size", "num_attention_heads") if getattr(args, f) is None]
        if missing:
            raise SystemExit("pretrain.py: without --model or --hf-config give " +
                             ", ".join("--" + m.replace("_", "-") for m in missing))
        family, base = "llama", {"ffn_hidden_size": 4 * args.hidden_size}
    over = {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size,
            "num_heads": args.num_attention_heads, "max_position_embeddings": args.max_position_embeddings}
    if args.group_query_attention:
        over["num_kv_heads"] = args.num_query_groups
    base.update({k: v for k, v in over.items() if v is not None})
    if args.num_attention_heads is not None or args.hidden_size is not None:
        base.pop("head_dim", None)  # re-derive from the new sizes
        if "num_kv_heads" not in over and (args.model or args.hf_config) and args.num_attention_heads is not None:
            base["num_kv_heads"] = min(base.get("num_kv_heads") or args.num_attention_heads, args.num_attention_heads)
    if args.vocab_size is not None:
        base["vocab_size"] = args.vocab_size
    elif tokenizer is not None and (not (args.model or args.hf_config)):
        base["vocab_size"] = tokenizer.vocab_size
    elif "vocab_size" not in base:
        raise SystemExit("pretrain.py: no vocabulary size: give --vocab-size or --tokenizer-model")
    base["pad_vocab_to"] = args.make_vocab_size_divisible_by
    if args.max_position_embeddings is None and not (args.model or args.hf_config):
        base["max_position_embeddings"] = args.seq_length
    base["dtype"] = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    try:
        cfg = ModelConfig.from_dict(base) if isinstance(base.get("dtype"), str) else ModelConfig(**base)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"pretrain.py: invalid model configuration: {e}") from None
    if args.seq_length > cfg.max_position_embeddings:
        raise SystemExit(f"pretrain.py: --seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{cfg.max_position_embeddings}")
    if tokenizer is not None:
        pdata.check_vocab_size(tokenizer, cfg.vocab_size)
    return cfg, family


def build_model(args, tokenizer):
    """Model and freshly initialised params (on ``--device``) from the flags."""
    cfg, family = build_config(args, tokenizer)
    model = build(cfg, family=family)
    params = pmodel.init(model, seed=args.seed, device=args.device)
    return model, params


def build_optimizer(args, model, params):
    """``(tx, opt_state, policy)`` from the optimizer / precision flags."""
    sched = optim.megatron(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.lr_warmup_iters,
                           decay_steps=args.lr_decay_iters or args.train_iters, style=args.lr_decay_style)
    parts = []
    if args.clip_grad > 0:
        parts.append(optim.clip_by_global_norm(args.clip_grad))
    parts.append(optim.adamw(sched, args.adam_beta1, args.adam_beta2, args.adam_eps, args.weight_decay))
    tx = optim.chain(*parts) if len(parts) > 1 else parts[0]
    scale = None
    if args.fp16:
        kw = {}
        if args.initial_loss_scale is not None:
            kw["initial"] = args.initial_loss_scale
        if args.loss_scale_window is not None:
            kw["growth_interval"] = args.loss_scale_window
        scale = LossScale(**kw)
    policy = Policy(param_dtype=model.config.dtype, grad_accum_fp32=args.accumulate_allreduce_grads_in_fp32,
                    loss_scale=scale)
    tx = mixed_precision(tx, policy)
    return tx, tx.init(params), policy


class MockDataset:
    """Deterministic random tokens: sample ``i`` depends only on (seed, i)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab, self.L, self.seed = vocab_size, seq_length, seed

    def sample(self, i: int) -> dict:
        g = np.random.default_rng([self.seed, int(i)])
        s = g.integers(0, self.vocab, self.L + 1, dtype=np.int64)
        return {"tokens": s[:-1], "labels": s[1:], "loss_mask": np.ones(self.L, np.float32),
                "position_ids": np.arange(self.L, dtype=np.int64)}


def build_data(args, model):
    """``(train_data, eval_data)``: ``consumed_samples -> iterator`` and ``() -> iterable`` (or None)."""
    from pmodel.data import CollatorConfig, MicroBatchLoader, build_pretrain_datasets
    gbs = args.global_batch_size or args.micro_batch_size
    if args.mock_data:
        train_ds = MockDataset(model.config.vocab_size, args.seq_length, args.seed)
        valid_ds = MockDataset(model.config.vocab_size, args.seq_length, args.seed + 1)
    else:
        n_eval = ((args.train_iters // args.eval_interval + 1) * _eval_iters(args) * gbs) if args.eval_interval else 0
        train_ds, valid_ds, _ = build_pretrain_datasets(
            args.data_path, split=args.split, seq_length=args.seq_length, seed=args.seed,
            num_samples=[args.train_iters * gbs, max(n_eval, 1), 1])
        if train_ds is None:
            raise SystemExit(f"pretrain.py: --split {args.split} leaves no training documents")
        if args.eval_interval and valid_ds is None:
            raise SystemExit(f"pretrain.py: --eval-interval given but --split {args.split} leaves no validation documents")
    dev = torch.device(args.device)
    coll = CollatorConfig(seq_length=args.seq_length)

    def to_batch(mb: dict) -> dict:
        # Pretraining rows are full, unpacked sequences: plain causal attention, so the dense
        # mask inputs the collator adds are dropped (they would force the masked attention path).
        return {k: mb[k].to(dev) for k in ("tokens", "labels", "loss_mask")}

    def loader(ds, start, num_samples=None):
        it = MicroBatchLoader(ds, micro_batch_size=args.micro_batch_size, num_micro_batches=gbs // args.micro_batch_size,
                              start=start, collator=coll, num_samples=num_samples)
        return ([to_batch(mb) for mb in micros] for micros in it)

    def train_data(consumed):
        # Samples past one epoch are valid indices (the dataset reshuffles per epoch), so the
        # loader is sized by what training needs, not by the dataset's epoch length.
        return loader(train_ds, consumed, args.train_iters * gbs)

    eval_data = None
    if args.eval_interval:
        def eval_data():
            return loader(valid_ds, 0)
    return train_data, eval_data


def setup(args):
    """Everything from flags: ``(model, params, tx, opt_state, policy, tokenizer)``."""
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args)
    model, params = build_model(args, tokenizer)
    if args.recompute_granularity is not None:
        from pmodel.recompute import recompute
        model = recompute(model, args.recompute_granularity, args.recompute_method,
                          args.recompute_num_layers if args.recompute_granularity == "full" else None)
    # (multi-process runs build their model, params and optimizer in run_parallel instead)
    tx, opt_state, policy = build_optimizer(args, model, params)
    return model, params, tx, opt_state, policy, tokenizer


def parallel_layout(args, cfg, world: int) -> dict:
    """The multi-process layout from the flags, checked against the model config and the world
    size before any process group exists (every rank refuses the same way, with the reason).

    Returns:
      ``{"tp", "pp", "dp", "microbatches", "layers_per_stage", "virtual_stages", "schedule",
      "stages"}``; ``microbatches`` is the micro-batches per data-parallel rank and step (the
      pipeline's ``M``), ``stages`` the ``(first_layer, num_layers)`` of every virtual stage.
    """
    from pmodel.parallel.pipeline import split_layers
    from pmodel.parallel.tensor import tp_size_problems

    def no(msg):
        raise SystemExit(f"pretrain.py: {msg}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    problems = tp_size_problems(cfg, tp)
    if problems:
        no(f"--tensor-model-parallel-size {tp}: " + "; ".join(problems))
    if world % (tp * pp):
        no(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp} = {tp * pp} does not divide "
           f"the world size {world}")
    dp, gbs = world // (tp * pp), args.global_batch_size or args.micro_batch_size
    n_micro = gbs // args.micro_batch_size
    if n_micro % dp:
        no(f"the global batch ({n_micro} micro-batches of {args.micro_batch_size}) does not split evenly over "
           f"data-parallel size {dp}")
    k = n_micro // dp
    lps = [int(x) for x in args.num_layer_list.split(",")] if args.num_layer_list else None
    V, nl = 1, args.num_layers_per_virtual_pipeline_stage
    if nl is not None:
        if cfg.num_layers % (pp * nl):
            no(f"--num-layers-per-virtual-pipeline-stage {nl}: {cfg.num_layers} layers do not split into "
               f"{pp} pipeline stages of chunks of {nl} layers")
        V = cfg.num_layers // (pp * nl)
        if V < 2:
            no(f"--num-layers-per-virtual-pipeline-stage {nl} gives each of the {pp} stages one chunk of "
               f"{cfg.num_layers // pp} layers; the interleaved schedule needs at least 2 chunks per stage "
               "(give a smaller value, or drop the flag for 1F1B)")
    schedule = args.pipeline_schedule or ("interleaved" if V > 1 else "1f1b")
    try:
        stages = split_layers(cfg.num_layers, pp, lps, V)
    except ValueError as e:
        no(f"--pipeline-model-parallel-size {pp} / --num-layer-list: {e}")
    if schedule == "interleaved" and k % pp:
        no(f"--pipeline-schedule interleaved needs the micro-batches per data-parallel rank ({k} = global batch "
           f"{gbs} / (micro batch {args.micro_batch_size} x dp {dp})) to be a multiple of "
           f"--pipeline-model-parallel-size {pp} (Megatron's requirement)")
    if pp > 1 and cfg.tie_embeddings:
        if tp > 1:
            no("tied embeddings with tensor parallel and --pipeline-model-parallel-size > 1 is not supported yet "
               "(pmodel.parallel.pipeline raises NotImplementedError: the vocab-parallel embedding's gradient is "
               "not summed between the first and last stage)")
        if args.use_distributed_optimizer:
            no("tied embeddings with --pipeline-model-parallel-size > 1 and --use-distributed-optimizer: the "
               "distributed optimizer's global gradient norm would count the embedding's two stage copies "
               "twice (not supported yet; drop --use-distributed-optimizer or untie the embeddings)")
    return {"tp": tp, "pp": pp, "dp": dp, "microbatches": k, "layers_per_stage": lps, "virtual_stages": V,
            "schedule": schedule, "stages": [list(s) for s in stages]}


BUCKET_NUMEL = 40_000_000  # DataParallel and the distributed optimizer must agree on it


def _ckpt_layout(args, lay: dict, world: int) -> dict:
    """What a multi-process checkpoint's shards depend on (a resume must match it)."""
    return {"world_size": world, "tp": lay["tp"], "pp": lay["pp"], "dp": lay["dp"], "stages": lay["stages"],
            "distributed_optimizer": bool(args.use_distributed_optimizer),
            "high_availability": bool(args.enable_high_availability)}


def run_parallel(args) -> int:
    """Tensor / sequence / pipeline / data parallel training (one process per rank).

    torchrun's RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT give the ranks; the mesh is
    ``pp x dp x tp`` (tp fastest, Megatron's order). Each rank initialises only its TP shards of
    its pipeline stage's leaves (equal to slicing the single-process keyed init) and takes its dp
    share of every global batch's micro-batches; with pp > 1 those run through
    :func:`pmodel.parallel.pipeline.pipeline` (1F1B / interleaved / zero-bubble), with pp = 1
    through :func:`pmodel.parallel.parallelize`'s step. Rank 0 logs the global mean loss (the
    pipeline broadcasts it from the last stage, then it is summed over dp), the lr and the
    global gradient norm. ``--save`` / ``--load`` write and resume per-rank shards
    (:func:`pmodel.checkpoint.distributed.save_sharded` / ``load_sharded``).
    """
    import torch.distributed as dist

    from pmodel.parallel import Mesh, init_distributed, parallelize, pipeline_train_step
    from pmodel.parallel.data import DataParallel
    from pmodel.parallel.optimizer import distributed_optimizer
    from pmodel.parallel.pipeline import pipeline
    from pmodel.parallel.tensor import tensor_parallel

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args)
    cfg, family = build_config(args, tokenizer)
    lay = parallel_layout(args, cfg, world)
    tp, pp, dp, k = lay["tp"], lay["pp"], lay["dp"], lay["microbatches"]
    gbs = args.global_batch_size or args.micro_batch_size
    clip = args.clip_grad if args.clip_grad > 0 else None
    init_distributed(rank=rank, world_size=world, device_type="cpu")
    try:
        mesh = Mesh.build(tp=tp, pp=pp)
        model = build(cfg, family=family)
        if args.recompute_granularity is not None:
            from pmodel.recompute import recompute
            model = recompute(model, args.recompute_granularity, args.recompute_method,
                              args.recompute_num_layers if args.recompute_granularity == "full" else None)
        sched = optim.megatron(lr=args.lr, min_lr=args.min_lr, warmup_steps=args.lr_warmup_iters,
                               decay_steps=args.lr_decay_iters or args.train_iters, style=args.lr_decay_style)
        tx = optim.adamw(sched, args.adam_beta1, args.adam_beta2, args.adam_eps, args.weight_decay)
        if args.bf16 and not args.use_distributed_optimizer:
            # bf16 params and activations, fp32 main weights and moments in the optimizer state (the
            # distributed optimizer keeps fp32 main shards itself, so it takes the plain adamw).
            tx = mixed_precision(tx, Policy(param_dtype=torch.bfloat16))
        if pp == 1:
            try:  # clipping goes to parallelize: a clip inside tx would see only local shards
                plan = parallelize(model, tx, mesh, sequence_parallel=args.sequence_parallel,
                                   distributed_optimizer=args.use_distributed_optimizer,
                                   overlap_grad_reduce=args.overlap_grad_reduce,
                                   high_availability=args.enable_high_availability,
                                   bucket_numel=BUCKET_NUMEL, max_grad_norm=clip)
            except ValueError as e:
                raise SystemExit(f"pretrain.py: {e}") from None
            params = pmodel.init(plan.model, seed=args.seed)
            tx = plan.tx
        else:
            try:
                tpm = tensor_parallel(model, mesh, sequence_parallel=args.sequence_parallel)
                pipe = pipeline(tpm, mesh, lay["schedule"], microbatches=k, layers_per_stage=lay["layers_per_stage"],
                                virtual_stages=lay["virtual_stages"])
            except (ValueError, NotImplementedError) as e:
                raise SystemExit(f"pretrain.py: {e}") from None
            # The stage's view of the model: its declarations are exactly the stage params' leaves,
            # which the TP-aware norm weights and the replicated-gradient sync walk.
            stage_model = tpm.replace(defs=pipe.stage_defs())
            if args.use_distributed_optimizer:
                if dp == 1:
                    import warnings
                    warnings.warn("--use-distributed-optimizer with data-parallel size 1: there is nothing to shard "
                                  "the optimizer state over, so it saves no memory", UserWarning, stacklevel=1)
                tx = distributed_optimizer(tx, mesh, model=stage_model, replica=args.enable_high_availability,
                                           bucket_numel=BUCKET_NUMEL, max_grad_norm=clip)
            params = pipe.init(seed=args.seed)
            tied_copy = "embed.weight" if cfg.tie_embeddings and pipe.is_last and not pipe.is_first else None
        opt_state = tx.init(params)
        layout = _ckpt_layout(args, lay, world)
        start, consumed = 0, 0
        if args.load:
            try:
                got = load_sharded(args.load, params, opt_state, rank=rank, layout=layout, config=cfg.to_dict())
            except ckpt.CheckpointError as e:
                raise SystemExit(f"pretrain.py: {e}") from None
            if got is None:
                if rank == 0:
                    print(f"no checkpoint under --load {args.load}; starting from scratch")
            else:
                params, opt_state, start, consumed, where = got
                if rank == 0:
                    print(f"resumed from {where} at iteration {start} ({consumed} samples consumed)")
        if pp == 1:
            buckets = plan.data_parallel(params)
        else:
            reduce = ("reduce_scatter" if args.use_distributed_optimizer and not args.enable_high_availability
                      else "all_reduce")
            buckets = DataParallel(params, mesh, bucket_numel=BUCKET_NUMEL, reduce=reduce)

        if pp > 1:
            pp_step = pipeline_train_step(pipe, stage_model, tx, mesh, buckets, max_grad_norm=clip,
                                          distributed_optimizer=args.use_distributed_optimizer,
                                          skip_norm_path=tied_copy)

        train_data, _ = build_data(args, model)
        lead, r = rank == 0, mesh.rank("dp")
        metrics = args.metrics_file or (str(Path(args.save) / "metrics.jsonl") if args.save else None)
        out = open(metrics, "a") if lead and metrics else None
        if lead:
            extra = (f", pipeline {lay['schedule']} with {k} micro-batches, stages {lay['stages']}" if pp > 1 else "")
            print(f"parallel: world {world} = pp {pp} x dp {dp} x tp {tp}{extra}; sequence parallel "
                  f"{args.sequence_parallel}, distributed optimizer {args.use_distributed_optimizer}, overlap "
                  f"{args.overlap_grad_reduce}, high availability {args.enable_high_availability}; "
                  f"{cfg.num_params() / 1e6:.2f}M params", flush=True)
        save_extra = {"args": {a: v for a, v in vars(args).items()}}
        t0, saved_at, step = time.perf_counter(), start, start
        for step, micros in zip(range(start + 1, args.train_iters + 1), train_data(consumed)):
            mine = micros[r * k:(r + 1) * k]
            if pp == 1:
                opt_state, m = plan.step(params, opt_state, buckets, mine)
            else:
                opt_state, m = pp_step(params, opt_state, mine)
            if args.save and args.save_interval and step % args.save_interval == 0:
                save_sharded(args.save, step, step * gbs, params, opt_state, rank=rank, layout=layout,
                              config=cfg.to_dict(), extra=save_extra)
                saved_at = step
            if step % args.log_interval and step != args.train_iters:
                continue
            rec = {"step": step, "loss": float(m["loss"]), "lr": optim.current_lr(opt_state),
                   "grad_norm": float(m["grad_norm"]), "consumed_samples": step * gbs,
                   "time_per_iter_s": (time.perf_counter() - t0) / (step - start)}
            if lead:
                print(f"iter {step}/{args.train_iters} | loss {rec['loss']:.4f} | lr {rec['lr'] or 0:.3e} | "
                      f"grad norm {rec['grad_norm']:.3f}", flush=True)
                if out is not None:
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
        if args.save and saved_at != step:  # a final checkpoint, as the single-process loop writes
            save_sharded(args.save, step, step * gbs, params, opt_state, rank=rank, layout=layout,
                          config=cfg.to_dict(), extra=save_extra)
        if out is not None:
            out.close()
    finally:
        dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    if parallel_requested(args):
        return run_parallel(args)
    try:
        model, params, tx, opt_state, policy, _ = setup(args)
    except (ValueError, FileNotFoundError) as e:  # bad flags / files: a message, not a traceback
        raise SystemExit(f"pretrain.py: {e}") from None
    cfg = model.config
    state = TrainState()
    if args.load:
        if ckpt.latest(args.load) is None:
            print(f"no checkpoint under --load {args.load}; starting from scratch")
        else:
            params, opt_state, man = ckpt.load(args.load, params=params, opt_state=opt_state, config=cfg.to_dict())
            state = TrainState(step=man["step"], consumed_samples=int(man["data"]["consumed_samples"]))
            print(f"resumed from {man['dir']} at iteration {state.step} ({state.consumed_samples} samples consumed)")
    train_data, eval_data = build_data(args, model)
    gbs = args.global_batch_size or args.micro_batch_size
    n_all = cfg.num_params()
    print(f"model: {model.family or 'custom'} {n_all / 1e6:.2f}M params ({cfg.num_params(embeddings=False) / 1e6:.2f}M "
          f"non-embedding), {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
          f"{cfg.num_kv_heads}, vocab {cfg.vocab_size}, {str(cfg.dtype).removeprefix('torch.')} on {args.device}; "
          f"global batch {gbs} x {args.seq_length} tokens, {gbs // args.micro_batch_size} micro-batch(es)")
    metrics = args.metrics_file or (str(Path(args.save) / "metrics.jsonl") if args.save else None)
    loop = LoopConfig(train_iters=args.train_iters, log_interval=args.log_interval, eval_interval=args.eval_interval,
                      eval_iters=_eval_iters(args), save_interval=args.save_interval, save_dir=args.save,
                      metrics_path=metrics, progress=not args.no_progress,
                      peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None)
    t0 = time.perf_counter()
    params, opt_state, state, hist = train(model, params, tx, opt_state, train_data, loop=loop, policy=policy,
                                           eval_data=eval_data, state=state, extra={"args": vars(args)})
    logs = [h for h in hist if "loss" in h]
    last = logs[-1]["loss"] if logs else float("nan")
    print(f"done: {state.step} iterations, {state.consumed_samples} samples, final loss {last:.4f}, "
          f"{time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
