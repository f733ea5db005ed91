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
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), help="ModelConfig.norm rms / layer")
    g.add_argument("--norm-epsilon", type=float, help="ModelConfig.norm_eps")
    g.add_argument("--position-embedding-type", choices=("rope", "learned_absolute", "alibi", "none"),
                   help="ModelConfig.position rope / learned / alibi / none")
    g.add_argument("--use-rotary-position-embeddings", action="store_true", help="= --position-embedding-type rope")
    g.add_argument("--rotary-base", type=float, help="RoPE theta (ModelConfig.rope_theta)")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in the q/k/v, output and MLP linears")
    g.add_argument("--add-qkv-bias", action="store_true", help="biases in the q/k/v linears (also with "
                                                               "--disable-bias-linear, as ModelLink)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (ModelConfig.activation swiglu)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="a separate output layer (ModelConfig.tie_embeddings False)")
    g.add_argument("--padded-vocab-size", type=int,
                   help="the model's vocabulary rows, all of them in the softmax (Megatron: replaces the padding of "
                        "--make-vocab-size-divisible-by)")
    g.add_argument("--init-method-std", type=float, help="std of the normal init (ModelConfig.init_std)")
    g.add_argument("--recompute-granularity", choices=("full", "selective"))
    g.add_argument("--recompute-method", choices=("uniform", "block"))
    g.add_argument("--recompute-num-layers", type=int)
    g = ap.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="indexed dataset prefix(es), optionally weighted: 0.3 a 0.7 b")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true", help="synthetic random tokens (smoke tests, benchmarks)")
    g.add_argument("--is-instruction-dataset", action="store_true",
                   help="--data-path is preprocess_data.py instruction output (<prefix>_packed_{input_ids,labels}_"
                        "document): loss on the response tokens only, rows padded to --seq-length (fine-tuning as "
                        "ModelLink does it through pretrain_gpt.py)")
    g = ap.add_argument_group("LoRA (ModelLink: enabled by --lora-target-modules)")
    g.add_argument("--lora-target-modules", nargs="+",
                   help="adapted projections: ModelLink names (query_key_value dense dense_h_to_4h dense_4h_to_h), HF "
                        "names (q_proj ...), 'all' or one regex")
    g.add_argument("--lora-r", type=int, help="adapter rank (default 16, as ModelLink)")
    g.add_argument("--lora-alpha", type=float, help="scale numerator: the adapter is multiplied by alpha / r "
                                                    "(default 32, as ModelLink)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapter input (default 0)")
    g.add_argument("--lora-load", help="start from this adapter: a PEFT folder (adapter_config.json; what a LoRA run's "
                                       "--save writes to <save>/adapter) or a LoRA run's checkpoint root")
    cli.add_tokenizer_flags(ap)
    cli.add_batch_flags(ap)
    cli.add_optimizer_flags(ap)
    cli.add_precision_flags(ap)
    cli.add_parallel_flags(ap)
    cli.add_kernel_flags(ap)
    cli.add_megatron_flags(ap)
    cli.add_moe_flags(ap)
    cli.add_loop_flags(ap)
    cli.add_profile_flags(ap)
    cli.add_debug_flag(ap)
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
    if args.is_instruction_dataset:
        if not args.data_path:
            no("--is-instruction-dataset reads preprocess_data.py instruction output: give --data-path")
        if len(args.data_path) != 1:
            no(f"--is-instruction-dataset reads one instruction dataset; --data-path got {len(args.data_path)} "
               "entries (blends are for pretraining data)")
    lora_given = [f"--lora-{k}" for k in ("r", "alpha", "dropout", "load")
                  if getattr(args, "lora_" + k) is not None]
    if lora_given and not args.lora_target_modules:
        no(f"{' '.join(lora_given)}: LoRA is enabled by --lora-target-modules (as ModelLink); give it")
    if args.lora_r is not None and args.lora_r < 1:
        no(f"--lora-r must be >= 1, got {args.lora_r}")
    if args.lora_dropout is not None and not 0.0 <= args.lora_dropout < 1.0:
        no(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.padded_vocab_size is not None:
        if args.vocab_size is not None:
            no("--padded-vocab-size and --vocab-size both set the model's vocabulary; give one")
        if args.make_vocab_size_divisible_by != 1:
            no("--padded-vocab-size gives the padded size itself; --make-vocab-size-divisible-by would pad again")
    if args.use_rotary_position_embeddings and args.position_embedding_type not in (None, "rope"):
        no(f"--use-rotary-position-embeddings contradicts --position-embedding-type {args.position_embedding_type}")
    if args.init_method_std is not None and not args.init_method_std > 0:
        no(f"--init-method-std must be positive, got {args.init_method_std}")
    if args.data_path and args.mock_data:
        no("--data-path and --mock-data both give training data; choose one")
    if not args.data_path and not args.mock_data:
        no("no training data: give --data-path (preprocessed .bin/.idx prefixes) or --mock-data")
    if args.split != "969,30,1" and not args.data_path:
        no("--split applies to --data-path")
    if args.recompute_granularity is None:
        if args.recompute_method is not None or args.recompute_num_layers is not None:
            no("--recompute-method / --recompute-num-layers need --recompute-granularity full")
    elif args.recompute_granularity == "selective":
        if args.recompute_method is not None or args.recompute_num_layers is not None:
            no("--recompute-method / --recompute-num-layers apply to --recompute-granularity full only "
               "(selective recomputes every layer's attention core)")
    elif args.recompute_method is None:
        no("--recompute-granularity full needs --recompute-method uniform or block")


# ModelConfig field -> the flag that sets it (messages name what the user typed).
ARCH_FLAGS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "ffn_hidden_size": "--ffn-hidden-size",
    "num_heads": "--num-attention-heads", "num_kv_heads": "--num-query-groups",
    "max_position_embeddings": "--max-position-embeddings", "norm": "--normalization", "norm_eps": "--norm-epsilon",
    "position": "--position-embedding-type", "rope_theta": "--rotary-base", "qkv_bias": "--disable-bias-linear / "
    "--add-qkv-bias", "o_bias": "--disable-bias-linear", "mlp_bias": "--disable-bias-linear",
    "activation": "--swiglu", "tie_embeddings": "--untie-embeddings-and-output-weights", "vocab_size":
    "--vocab-size / --padded-vocab-size", "pad_vocab_to": "--make-vocab-size-divisible-by",
    "num_experts": "--num-experts", "moe_top_k": "--moe-router-topk",
}
# Fields that configure training, not the architecture: flags may change them on top of any source.
TRAINING_FIELDS = ("init_std", "dtype", "moe_aux_loss_coeff", "moe_aux_loss_type", "moe_z_loss_coeff",
                   "moe_capacity_factor", "moe_drop_policy")


def arch_overrides(args) -> dict:
    """The ModelConfig fields the architecture flags set (only flags given)."""
    over = {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "ffn_hidden_size": args.ffn_hidden_size,
            "num_heads": args.num_attention_heads, "max_position_embeddings": args.max_position_embeddings,
            "norm_eps": args.norm_epsilon, "rope_theta": args.rotary_base, "init_std": args.init_method_std}
    if args.group_query_attention:
        over["num_kv_heads"] = args.num_query_groups
    if args.normalization:
        over["norm"] = {"RMSNorm": "rms", "LayerNorm": "layer"}[args.normalization]
    pos = args.position_embedding_type or ("rope" if args.use_rotary_position_embeddings else None)
    if pos:
        over["position"] = {"learned_absolute": "learned"}.get(pos, pos)
    if args.disable_bias_linear:
        over.update(qkv_bias=False, o_bias=False, mlp_bias=False)
    if args.add_qkv_bias:
        over["qkv_bias"] = True
    if args.swiglu:
        over["activation"] = "swiglu"
    if args.untie_embeddings_and_output_weights:
        over["tie_embeddings"] = False
    if args.padded_vocab_size is not None:
        over["vocab_size"] = args.padded_vocab_size
    elif args.vocab_size is not None:
        over["vocab_size"] = args.vocab_size
    over.update(cli.moe_overrides(args))
    return {k: v for k, v in over.items() if v is not None}


def build_config(args, tokenizer) -> tuple[ModelConfig, str | None]:
    """The ModelConfig from --model / --hf-config / --load-hf / architecture flags.

    A preset (--model) is a starting point the flags change. An HF config (--hf-config, --load-hf)
    describes a checkpoint: a flag that disagrees with it is refused, naming both values.
    Without either, the flags describe the model on a LLaMA base (RMSNorm, RoPE, SwiGLU, no biases,
    untied; docs/modellink.md lists how this differs from Megatron's GPT defaults)."""
    over = arch_overrides(args)
    if args.model:
        family, cfg = pmodel.families.preset_config(args.model)
        base = cfg.to_dict()
    elif args.hf_config or args.load_hf:
        src = "--hf-config" if args.hf_config else "--load-hf"
        fam, cfg = pmodel.families.config_from_hf(args.hf_config or args.load_hf)
        family, base = fam.name, cfg.to_dict()
        bad = [f"{ARCH_FLAGS.get(k, k)} gives {k}={v!r}, the config {base[k]!r}" for k, v in over.items()
               if k not in TRAINING_FIELDS and k in base and base[k] != v]
        if bad:
            cli.refuse(PROG, f"the architecture flags disagree with {src} {args.hf_config or args.load_hf}: "
                             + "; ".join(bad) + " (drop the flags or change the config)")
    else:
        missing = [f for f in ("num_layers", "hidden_size", "num_attention_heads") if getattr(args, f) is None]
        if missing:
            cli.refuse(PROG, "without --model, --hf-config or --load-hf give " +
                       ", ".join("--" + m.replace("_", "-") for m in missing))
        family, base = "llama", {"ffn_hidden_size": 4 * args.hidden_size}
    named = args.model or args.hf_config or args.load_hf
    base.update(over)
    if args.num_attention_heads is not None or args.hidden_size is not None:
        if not (args.hf_config or args.load_hf):
            base.pop("head_dim", None)  # re-derive from the new sizes
        if "num_kv_heads" not in over and args.model and args.num_attention_heads is not None:
            base["num_kv_heads"] = min(base.get("num_kv_heads") or args.num_attention_heads, args.num_attention_heads)
    if "num_kv_heads" not in over and not named:
        base.pop("num_kv_heads", None)
    if "vocab_size" in over:
        pass
    elif tokenizer is not None and not named:
        base["vocab_size"] = tokenizer.vocab_size
    elif "vocab_size" not in base:
        cli.refuse(PROG, "no vocabulary size: give --vocab-size or a tokenizer")
    if not args.load_hf:
        base["pad_vocab_to"] = args.make_vocab_size_divisible_by
    if args.max_position_embeddings is None and not named:
        base["max_position_embeddings"] = args.seq_length
    if base.get("num_experts") and "moe_ffn_hidden_size" not in over and not named:
        base["moe_ffn_hidden_size"] = base["ffn_hidden_size"]  # Megatron's experts use --ffn-hidden-size
    if args.num_experts is not None and args.model and args.ffn_hidden_size is not None:
        base["moe_ffn_hidden_size"] = args.ffn_hidden_size
    base["dtype"] = cli.dtype_of(args)
    try:
        cfg = ModelConfig.from_dict(base) if isinstance(base.get("dtype"), str) else ModelConfig(**base)
    except (TypeError, ValueError) as e:
        cli.refuse(PROG, f"invalid model configuration: {cli.flag_message(str(e))}")
    if args.seq_length > cfg.max_position_embeddings:
        cli.refuse(PROG, f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{cfg.max_position_embeddings}")
    if tokenizer is not None:
        try:
            pdata.check_vocab_size(tokenizer, cfg.vocab_size)
        except ValueError as e:
            cli.refuse(PROG, str(e))
    return cfg, family


def check_against_checkpoint(args, cfg: ModelConfig, root, what: str) -> ModelConfig:
    """Refuse a model that differs from the checkpoint under ``root`` (architecture fields named by
    their flags). Returns ``cfg`` with the checkpoint's init std: loaded parameters make
    --init-method-std moot (noted)."""
    import dataclasses
    import json

    from pmodel.checkpoint.state import latest
    d = latest(root)
    if d is None:
        return cfg
    saved = json.loads((d / "manifest.json").read_text()).get("config") or {}
    cur = cfg.to_dict()
    bad = [f"{ARCH_FLAGS.get(k, k)}: checkpoint {k}={saved[k]!r}, this run {cur[k]!r}" for k in sorted(saved)
           if k in cur and saved[k] != cur[k] and k not in TRAINING_FIELDS]
    if bad:
        cli.refuse(PROG, f"the model differs from the checkpoint under {what} {root} ({d.name}): " + "; ".join(bad))
    if "init_std" in saved and saved["init_std"] != cfg.init_std:
        if args.init_method_std is not None:
            args.notes.append(f"--init-method-std {args.init_method_std}: the parameters come from {what}, so "
                              "nothing is initialised with it")
        cfg = dataclasses.replace(cfg, init_std=saved["init_std"])
    return cfg


class MockDataset:
    """Deterministic random tokens: sample ``i`` depends only on (seed, i)."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int):
        self.vocab, self.L, self.seed = vocab_size, seq_length, seed

    def sample(self, i: int) -> dict:
        g = np.random.default_rng([self.seed, int(i)])
        s = g.integers(0, self.vocab, self.L + 1, dtype=np.int64)
        return {"tokens": s[:-1], "labels": s[1:], "loss_mask": np.ones(self.L, np.float32),
                "position_ids": np.arange(self.L, dtype=np.int64)}


class InstructionSplit:
    """Documents ``[start, end)`` of an instruction dataset in a seeded order, reshuffled each epoch
    (sample ``i`` depends only on (seed, i), so a resumed run continues where it stopped)."""

    def __init__(self, dataset, start: int, end: int, seed: int):
        self.ds, self.start, self.n, self.seed = dataset, start, end - start, seed
        self._perm = {}

    def __len__(self) -> int:
        return self.n

    def sample(self, i: int) -> dict:
        epoch, j = divmod(int(i), self.n)
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self.ds.sample(self.start + int(self._perm[epoch][j]))


def instruction_datasets(args):
    """``(train, valid)`` :class:`InstructionSplit` of --data-path by --split (valid may be None)."""
    from pmodel.data import InstructionDataset
    from pmodel.data.pretrain import split_ranges
    try:
        ds = InstructionDataset(args.data_path[0])
    except (FileNotFoundError, ValueError) as e:
        cli.refuse(PROG, f"--is-instruction-dataset --data-path {args.data_path[0]}: {e}")
    if not len(ds):
        cli.refuse(PROG, f"--is-instruction-dataset --data-path {args.data_path[0]} holds no examples")
    # A row is one document (a packed document holds several examples); --seq-length bounds it.
    pos = np.concatenate([[0], np.cumsum(ds.ids.sequence_lengths.astype(np.int64) - 1)])  # (S+1,)
    doc = ds.ids.document_indices  # (D+1,)
    per_doc = pos[doc[1:]] - pos[doc[:-1]]  # (D,) training positions per document
    if per_doc.size and int(per_doc.max()) > args.seq_length:
        k = int(per_doc.argmax())
        cli.refuse(PROG, f"{args.data_path[0]}: example {k} has {int(per_doc[k])} training positions, more than "
                         f"--seq-length {args.seq_length} (re-run preprocess_data.py with --seq-length "
                         f"{args.seq_length})")
    (a, b), (c, d), _ = split_ranges(args.split, len(ds))
    train = InstructionSplit(ds, a, b, args.seed) if b > a else None
    valid = InstructionSplit(ds, c, d, args.seed + 1) if d > c else None
    return train, valid


def build_data(args, cfg, launch, lay):
    """``(train_data, eval_data)``: ``consumed_samples -> iterator`` of this rank's micro-batches and
    ``() -> iterable`` (or None)."""
    from pmodel.data import CollatorConfig, build_pretrain_datasets
    gbs, iters = lay["global_batch"], args.eval_iters or 100
    evaluate = bool(args.eval_interval) and args.eval_iters != 0
    if args.is_instruction_dataset:
        train_ds, valid_ds = instruction_datasets(args)
    elif args.mock_data:
        train_ds = MockDataset(cfg.vocab_size, args.seq_length, args.seed)
        valid_ds = MockDataset(cfg.vocab_size, args.seq_length, args.seed + 1)
    else:
        n_eval = ((args.train_iters // args.eval_interval + 1) * iters * gbs) if args.eval_interval else 0
        train_ds, valid_ds, _ = build_pretrain_datasets(
            args.data_path, split=args.split, seq_length=args.seq_length, seed=args.seed,
            num_samples=[args.train_iters * gbs, max(n_eval, 1), 1])
    if train_ds is None:
        cli.refuse(PROG, f"--split {args.split} leaves no training documents")
    if evaluate and valid_ds is None:
        # Megatron builds no validation dataset then and skips evaluation (ModelLink's tune
        # scripts pass --split 100,0,0 with --eval-iters 10): said once, training unchanged.
        evaluate = False
        args.notes.append(f"--eval-interval {args.eval_interval}: --split {args.split} leaves no validation "
                          "documents, so nothing is evaluated (as Megatron)")
    if args.eval_interval and args.eval_iters == 0:
        args.notes.append(f"--eval-iters 0: no evaluation (as Megatron), --eval-interval {args.eval_interval} unused")
    cli.say_notes(args, launch)
    dev = launch.device

    def to_batch(mb: dict) -> dict:
        if args.is_instruction_dataset:  # padded / packed rows: the collator's masks and positions matter
            return {k: v.to(dev) for k, v in mb.items()}
        # Pretraining rows are full, unpacked sequences: plain causal attention, so the dense
        # mask inputs the collator adds are dropped (they would force the masked attention path).
        return {k: mb[k].to(dev) for k in ("tokens", "labels", "loss_mask")}

    coll = CollatorConfig(seq_length=args.seq_length)
    # Samples past one epoch are valid indices (the dataset reshuffles per epoch), so the loader is
    # sized by what training needs, not by the dataset's epoch length.
    train_data = cli.loader(train_ds, args, launch, lay, coll, to_batch, num_samples=args.train_iters * gbs,
                            vocab_size=cfg.vocab_size)
    eval_data = None
    if evaluate:
        eval_loader = cli.loader(valid_ds, args, launch, lay, coll, to_batch, vocab_size=cfg.vocab_size)

        def eval_data():
            return eval_loader(0)
    return train_data, eval_data


def _manifest(root):
    import json

    from pmodel.checkpoint.state import CheckpointError, latest
    try:
        d = latest(root) if root else None
        return json.loads((d / "manifest.json").read_text()) if d is not None else None
    except (CheckpointError, ValueError, OSError) as e:
        cli.refuse(PROG, f"{root}: {e}")


def lora_setup(args, launch, base_model, cfg):
    """LoRA on the base model (ModelLink: --lora-target-modules enables it).

    Returns ``(lora_model, full_params or None, load_root or None)``: the full (single-process
    layout) LoRA params to shard, or None when the run resumes a LoRA run's checkpoint (loaded by
    :func:`cli.run` from ``load_root``)."""
    from pathlib import Path as _P

    from pmodel import lora as L
    from pmodel.checkpoint import peft as peft_io
    from pmodel.checkpoint import sharded
    r = args.lora_r if args.lora_r is not None else 16
    alpha = args.lora_alpha if args.lora_alpha is not None else 32.0
    targets = args.lora_target_modules[0] if len(args.lora_target_modules) == 1 else args.lora_target_modules
    try:
        lm = L.lora(base_model, r, alpha, args.lora_dropout or 0.0, targets)
    except (ValueError, KeyError) as e:
        cli.refuse(PROG, f"--lora-target-modules {' '.join(args.lora_target_modules)}: {e}")
    spec = L.spec_of(lm)
    load_man = _manifest(args.load)
    lora_ck = args.lora_load and _manifest(args.lora_load)
    if lora_ck is not None and lora_ck:
        # A LoRA run's checkpoint root holds the whole adapted model: resume from it.
        if not (lora_ck.get("extra") or {}).get("lora"):
            cli.refuse(PROG, f"--lora-load {args.lora_load} is a checkpoint of a run without LoRA")
        _check_spec(args, spec, lora_ck["extra"]["lora"], f"--lora-load {args.lora_load}")
        if args.load:
            args.notes.append(f"--load {args.load}: the --lora-load checkpoint holds the base weights too; they are "
                              "read from it")
        return lm, None, args.lora_load
    if load_man is not None and (load_man.get("extra") or {}).get("lora"):
        if args.lora_load:
            cli.refuse(PROG, f"--load {args.load} is a LoRA run's checkpoint and --lora-load gives another adapter; "
                             "give one")
        _check_spec(args, spec, load_man["extra"]["lora"], f"--load {args.load}")
        return lm, None, args.load
    # The base weights: --load (parameters only), --load-hf, or a fresh init.
    launch.say(f"LoRA: rank {spec.rank}, alpha {spec.alpha}, {len(spec.modules)} modules ({', '.join(spec.names)}); "
               "base weights frozen")
    full = pmodel.init(base_model, seed=args.seed)
    if args.load_hf:
        full = pmodel.load_hf(args.load_hf, dtype=cfg.dtype)[1]
    elif load_man is not None:
        try:
            full, _, man = sharded.load(args.load, params=full, config=cfg.to_dict(), cast_dtype=True,
                                        verify=not args.no_verify_checksums)
        except Exception as e:  # CheckpointError and friends, with the file named
            cli.refuse(PROG, f"--load {args.load}: {e}")
        launch.say(f"loaded the base parameters from {man['dir'] if 'dir' in man else args.load} (LoRA: the "
                   "optimizer, RNG and position of the base run do not apply)")
    elif args.load:
        cli.check_fresh_start(args, PROG)
        launch.say(f"no checkpoint under --load {args.load}; the base weights start from scratch")
    if args.lora_load:
        p = _P(args.lora_load)
        if not (p / "adapter_config.json").exists() and (p / "adapter" / "adapter_config.json").exists():
            p = p / "adapter"
        if not (p / "adapter_config.json").exists():
            cli.refuse(PROG, f"--lora-load {args.lora_load}: neither a PEFT adapter folder (adapter_config.json) nor "
                             "a LoRA run's checkpoint root")
        try:
            am, ap_ = peft_io.load_adapter(base_model, full, p)
        except (ValueError, KeyError, FileNotFoundError) as e:
            cli.refuse(PROG, f"--lora-load {args.lora_load}: {e}")
        a = L.spec_of(am)
        _check_spec(args, spec, {"rank": a.rank, "alpha": a.alpha, "modules": list(a.modules)},
                    f"--lora-load {args.lora_load}")
        lp = L.adapt(lm, full, seed=args.seed)
        lp = L.load_adapter_params(lp, L.adapter_params(ap_))
        launch.say(f"LoRA adapter from {p}")
        return lm, lp, None
    return lm, L.adapt(lm, full, seed=args.seed), None


def _check_spec(args, spec, saved: dict, what: str) -> None:
    bad = []
    if int(saved["rank"]) != spec.rank:
        bad.append(f"--lora-r {spec.rank} (adapter: {saved['rank']})")
    if float(saved["alpha"]) != float(spec.alpha):
        bad.append(f"--lora-alpha {spec.alpha:g} (adapter: {float(saved['alpha']):g})")
    if sorted(saved["modules"]) != sorted(spec.modules):
        bad.append(f"--lora-target-modules {' '.join(args.lora_target_modules)} name {len(spec.modules)} modules, "
                   f"the adapter has {len(saved['modules'])} (e.g. {sorted(saved['modules'])[:2]})")
    if bad:
        cli.refuse(PROG, f"the LoRA flags disagree with {what}: " + "; ".join(bad))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    launch = cli.Launch(args, PROG)
    try:
        tokenizer = cli.load_tokenizer(args, slow=args.tokenizer_not_use_fast)
    except (ValueError, FileNotFoundError) as e:
        cli.refuse(PROG, str(e))
    cfg, family = build_config(args, tokenizer)
    lora_on = bool(args.lora_target_modules)
    if args.load:
        man = _manifest(args.load)
        if man is not None:
            cfg = check_against_checkpoint(args, cfg, args.load, "--load")
            family = (man.get("extra") or {}).get("family", family) if not (args.model or args.hf_config) else family
            if (man.get("extra") or {}).get("lora") and not lora_on:
                cli.refuse(PROG, f"--load {args.load} holds a LoRA run ({man['extra']['lora']['rank']=}); give its "
                                 "--lora-target-modules / --lora-r / --lora-alpha")
    if args.lora_load and _manifest(args.lora_load) is not None:
        cfg = check_against_checkpoint(args, cfg, args.lora_load, "--lora-load")
    lay = launch.layout(args, cfg)
    kernels = cli.kernels_of(args, launch.device, PROG)
    torch.manual_seed(args.seed)
    model = build(cfg, kernels, family=family)
    full, load_root = None, args.load
    if lora_on:
        model, full, load_root = lora_setup(args, launch, model, cfg)
    if args.recompute_granularity is not None:
        model = pmodel.recompute(model, args.recompute_granularity, args.recompute_method,
                                 args.recompute_num_layers if args.recompute_granularity == "full" else None)
    hook = None
    if lora_on and (args.lora_dropout or 0.0) > 0:
        from pmodel import lora as L

        def hook(p, i):  # dropout masks keyed by the global micro-batch number (layout-independent)
            return L.bind_dropout(p, train=False) if i is None else L.bind_dropout(p, seed=args.seed, step=i)
    tx, clip = cli.optimizer_of(args)
    launch.build_mesh(lay)
    try:
        plan = cli.build_plan(args, launch, model, tx, lay, max_grad_norm=clip, policy=cli.policy_of(args), hook=hook)
        template = full if (lora_on and full is not None and launch.lead) else None
        if full is not None:
            params = pmodel.tree.map(lambda t: t.to(launch.device), plan.shard(full))
            if launch.world > 1 and not launch.lead:
                full = None
        elif args.load_hf and not lora_on:
            _, full = pmodel.load_hf(args.load_hf, dtype=cfg.dtype)
            params = plan.shard(full)
            params = pmodel.tree.map(lambda t: t.to(launch.device), params)
            full = None
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
        ep = f" x ep {lay['ep']}" if lay["ep"] > 1 else ""
        if cfg.num_experts:
            launch.say(f"MoE: {cfg.num_experts} experts of width {cfg.moe_ffn_hidden_size}, top {cfg.moe_top_k}, "
                       + (f"capacity {cfg.moe_capacity_factor} ({cfg.moe_drop_policy})" if cfg.moe_capacity_factor
                          else "dropless")
                       + f", aux loss {cfg.moe_aux_loss_coeff} ({cfg.moe_aux_loss_type}), z loss {cfg.moe_z_loss_coeff}"
                       + f", grouped gemm {kernels.fused_moe}")
        launch.say(f"parallel: world {launch.world} = pp {lay['pp']} x dp {lay['dp']}{ep} x tp {lay['tp']}{extra}; "
                   f"sequence parallel {args.sequence_parallel}, distributed optimizer "
                   f"{args.use_distributed_optimizer}, overlap {args.overlap_grad_reduce}, high availability "
                   f"{args.enable_high_availability}")
        t0 = time.perf_counter()
        run_extra = {"args": {k: v for k, v in vars(args).items() if k != "notes"},
                     "family": family}
        if lora_on:
            from pmodel import lora as L
            sp = L.spec_of(model)
            run_extra["lora"] = {"rank": sp.rank, "alpha": sp.alpha, "dropout": sp.dropout, "modules": list(sp.modules)}
            args.load = load_root  # the base weights are in place already; --load resumes a LoRA run only
        try:
            params, _, state, hist = cli.run(args, launch, plan, params, opt_state, train_data, eval_data=eval_data,
                                             config=cfg, extra=run_extra)
            if lora_on and args.save:
                # The adapter as PEFT files too (generate.py / convert_ckpt.py / finetune.py read them).
                if template is None and launch.lead:
                    template = pmodel.init(model, seed=args.seed)
                final = cli.gather(plan, params, template, Path(args.save) / ".gather")
                if launch.lead:
                    from pmodel.checkpoint import peft as peft_io
                    peft_io.save_adapter(model, final, Path(args.save) / "adapter")
                    launch.say(f"LoRA adapter saved to {Path(args.save) / 'adapter'}")
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
    raise SystemExit(cli.run_main(main, PROG))
