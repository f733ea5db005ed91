"""What pretrain.py and finetune.py share: Megatron / ModelLink flags -> library configs.

Flags only: every flag is translated into an explicit argument of a library call
(:func:`pmodel.parallel.parallelize`, :func:`pmodel.train.train`, the tokenizer loader, the
kernel policy), and library errors come back with the library's argument names replaced by the
flags a user typed. No training logic lives here.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pmodel  # noqa: E402
from pmodel import optim  # noqa: E402
from pmodel.parallel import Mesh, PipelineSpec, init_distributed, parallelize  # noqa: E402
from pmodel.precision import LossScale, Policy  # noqa: E402

# Megatron / ModelLink --tokenizer-type values -> pmodel.data.load_tokenizer kinds.
TOKENIZER_TYPES = {
    "PretrainedFromHF": "auto", "HuggingFaceTokenizer": "hf", "HFTokenizer": "hf", "GPT2BPETokenizer": "hf",
    "SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
    "Llama2Tokenizer": "sentencepiece", "TikTokenizer": "tiktoken", "TiktokenTokenizer": "tiktoken",
    "ByteTokenizer": "bytes", "auto": "auto",
}

# Library argument names -> the flags that set them (for error messages).
FLAGS = {
    "sequence_parallel": "--sequence-parallel", "distributed_optimizer": "--use-distributed-optimizer",
    "high_availability": "--enable-high-availability", "overlap_grad_reduce": "--overlap-grad-reduce",
    "max_grad_norm": "--clip-grad", "grad_accum_fp32": "--accumulate-allreduce-grads-in-fp32",
    "layers_per_stage": "--num-layer-list", "virtual_stages": "--num-layers-per-virtual-pipeline-stage",
    "fused_attention": "--use-flash-attn", "fused_norm": "--use-fused-rmsnorm", "fused_swiglu": "--use-fused-swiglu",
    "fused_rotary": "--use-fused-rotary-pos-emb", "mc2": "--use-mc2", "flash_attn": "--use-flash-attn",
    "fused_rmsnorm": "--use-fused-rmsnorm",
    "tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
    "ep": "--expert-model-parallel-size", "grouped_gemm": "--moe-grouped-gemm",
    "num_experts": "--num-experts", "moe_top_k": "--moe-router-topk",
    "moe_capacity_factor": "--moe-expert-capacity-factor", "moe_drop_policy": "--moe-token-drop-policy",
    "moe_aux_loss_coeff": "--moe-aux-loss-coeff", "moe_z_loss_coeff": "--moe-z-loss-coeff",
}


def flag_message(msg: str) -> str:
    """A library message with argument names (``high_availability``, ``tp=2``) shown as flags."""
    msg = re.sub(r"\b(tp|pp|ep)=(\d+)", lambda m: f"{FLAGS[m.group(1)]} {m.group(2)}", msg)
    msg = msg.replace("ModelConfig.pad_vocab_to", "--make-vocab-size-divisible-by")
    return re.sub(r"\b(" + "|".join(sorted(FLAGS, key=len, reverse=True)) + r")\b(?=[ =)]|$)",
                  lambda m: FLAGS[m.group(1)], msg)


def refuse(prog: str, msg: str):
    """A user error: ``<prog>: error: <msg>`` on stderr, exit status 1, no traceback."""
    raise SystemExit(f"{prog}: error: {msg}")


# What a user's input can raise from the library (bad files, values, checkpoints): one line, no
# traceback, unless --debug.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               UnicodeDecodeError)


def add_debug_flag(ap) -> None:
    ap.add_argument("--debug", action="store_true",
                    help="show the Python traceback of an error (by default a user error is one 'error:' line)")


def run_main(main, prog: str, argv=None) -> int:
    """Run a CLI's ``main`` the way ``python scripts/<prog>`` does: a library error caused by the
    input (:data:`USER_ERRORS`) prints ``<prog>: error: <message>`` and exits 1 without a traceback,
    unless ``--debug`` is given."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        rc = main(argv)
    except USER_ERRORS as e:
        if "--debug" in argv:
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: error: {msg.strip() or type(e).__name__} ({type(e).__name__}; --debug shows the traceback)",
              file=sys.stderr, flush=True)
        return 1
    return rc or 0


# ----------------------------------------------------------------------------- flag groups
def add_tokenizer_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("tokenizer (as preprocess_data.py)")
    g.add_argument("--tokenizer-type", choices=sorted(TOKENIZER_TYPES))
    g.add_argument("--tokenizer-name-or-path", help="folder holding the tokenizer files (an HF model folder)")
    g.add_argument("--tokenizer-model", help="tokenizer file (.model, .tiktoken, tokenizer.json)")
    if "--tokenizer-not-use-fast" not in ap._option_string_actions:  # the inference CLIs add their own
        g.add_argument("--tokenizer-not-use-fast", action="store_true",
                       help="Hugging Face tokenizers: the slow (Python) implementation instead of the fast one")


def add_batch_flags(ap, *, micro_default=None) -> None:
    g = ap.add_argument_group("batch (Megatron: global = micro x micro-batches per rank x data-parallel size)")
    g.add_argument("--micro-batch-size", type=int, required=micro_default is None, default=micro_default)
    g.add_argument("--global-batch-size", type=int, help="default: --micro-batch-size x data-parallel size")


def add_optimizer_flags(ap, *, lr_default=None, decay_style="linear", weight_decay=0.01) -> None:
    g = ap.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, required=lr_default is None, default=lr_default)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float,
                   help="warmup length as a fraction of the decay length (Megatron: fraction x --lr-decay-iters, "
                        "not rounded); exclusive with --lr-warmup-iters")
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--lr-decay-style", default=decay_style, choices=optim.STYLES)
    g.add_argument("--weight-decay", type=float, default=weight_decay)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global-norm clipping; 0 disables")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)


def add_precision_flags(ap) -> None:
    g = ap.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true", help="bf16 params and activations, fp32 main weights")
    g.add_argument("--fp16", action="store_true", help="fp16 params and activations, fp32 main weights, loss scaling")
    g.add_argument("--initial-loss-scale", type=float, help="fp16 dynamic loss scale start (default 2**32)")
    g.add_argument("--loss-scale-window", type=int, help="fp16: clean steps before the scale grows (default 1000)")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="accumulate bf16/fp16 micro-batch gradients in fp32 buffers")


def add_parallel_flags(ap) -> None:
    g = ap.add_argument_group("parallelism (launch with torch.distributed.run, one process per rank)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true",
                   help="keep activations sharded on the sequence between TP regions (needs TP > 1)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="ZeRO-1: fp32 main params and Adam moments sharded over the data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce each gradient bucket during backward (needs dp > 1, pp = 1)")
    g.add_argument("--enable-high-availability", action="store_true",
                   help="replica optimizer (each optimizer shard held by two dp ranks) and, with --save, a failure "
                        "checkpoint: when a rank fails, the survivors write the last completed step (docs/operations.md)")
    g.add_argument("--enable-optimizer-state-local-copy", action="store_true",
                   help="keep a copy of the optimizer state at each step's start, so a rank stopped in the middle of "
                        "its optimizer update rolls back and still contributes to the failure checkpoint")
    g.add_argument("--integrity-check", action="store_true",
                   help="after every step, check for non-finite gradients / parameters; on a fault restore the "
                        "step's starting state (a local copy) and redo the step")
    g.add_argument("--integrity-checksum", action="store_true",
                   help="also compare a checksum of the replica optimizer's two copies of every shard "
                        "(needs --enable-high-availability)")
    g.add_argument("--integrity-max-redo", type=int, help="redo a faulty step at most this often (default 1)")
    g.add_argument("--num-layer-list", help="comma-separated layers per pipeline stage (uneven split), e.g. 1,3")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                   help="layers per model chunk: the interleaved schedule's virtual stages")
    g.add_argument("--pipeline-schedule", choices=("1f1b", "interleaved", "zero-bubble"),
                   help="default: interleaved with virtual stages, else 1f1b")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="expert parallelism: the MoE experts split over this many ranks (the mesh's ep dimension; "
                        "world = tp x ep x dp x pp, the ep ranks read different micro-batches as Megatron's "
                        "expert-data-parallel ranks do)")
    g.add_argument("--device", help="cpu, cuda or npu (under torchrun: the LOCAL_RANK-th device); default: from "
                                    "--distributed-backend (nccl: cuda, or npu where torch_npu maps nccl to hccl; "
                                    "hccl: npu; gloo: cpu), else cpu")
    g.add_argument("--distributed-backend", choices=("gloo", "nccl", "hccl"),
                   help="torch.distributed backend of the process groups (default: the device's: gloo / nccl / hccl)")
    g.add_argument("--local-rank", "--local_rank", type=int, default=None,
                   help="set by torch.distributed.launch (the LOCAL_RANK environment variable wins)")
    g.add_argument("--distributed-timeout-minutes", type=float,
                   help="collective timeout of every process group (default: torch's, 30 minutes on gloo): a peer "
                        "that stops answering makes a collective fail after this long")
    g.add_argument("--use-deter-comp", action="store_true",
                   help="deterministic computation: every RNG seeded from --seed, deterministic kernels only, "
                        "data-parallel sums in a fixed rank order (and CUBLAS_WORKSPACE_CONFIG / HCCL_DETERMINISTIC "
                        "set for cuda / npu): two runs give the same bits")


def add_kernel_flags(ap) -> None:
    g = ap.add_argument_group("fused kernels (ModelLink names; refused where the device has no such kernel)")
    g.add_argument("--use-flash-attn", action="store_true")
    g.add_argument("--use-fused-rmsnorm", action="store_true")
    g.add_argument("--use-fused-swiglu", action="store_true")
    g.add_argument("--use-fused-rotary-pos-emb", action="store_true")
    g.add_argument("--use-mc2", action="store_true", help="NPU: fused all-gather+matmul / matmul+reduce-scatter "
                                                           "for sequence-parallel linears")


def add_megatron_flags(ap) -> None:
    """Megatron switches of kernels and numerics that pmodel honours by construction (a documented
    note in the log) or refuses when they would change results (dropout)."""
    g = ap.add_argument_group("Megatron switches (docs/modellink.md: what each maps to)")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="every attention path here takes the softmax in fp32 already (noted in the log)")
    g.add_argument("--no-masked-softmax-fusion", action="store_true",
                   help="Megatron's fused scale-mask-softmax kernel does not exist here (noted in the log)")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_true",
                   help="weight gradients are always computed in the parameter dtype, then accumulated (what this "
                        "flag asks; noted in the log)")
    g.add_argument("--jit-compile", action="store_true",
                   help="NPU: torch_npu.npu.set_compile_mode(jit_compile=True) (operator compilation; same "
                        "numerics); elsewhere noted in the log")
    g.add_argument("--hidden-dropout", type=float, help="only 0 (pmodel's decoder has no dropout; Megatron's "
                                                        "default 0.1 is refused when asked for)")
    g.add_argument("--attention-dropout", type=float, help="only 0 (as --hidden-dropout)")


def add_moe_flags(ap, *, architecture: bool = True) -> None:
    """Megatron / ModelLink mixture-of-experts flags -> the ModelConfig MoE fields (docs/moe.md)."""
    g = ap.add_argument_group("mixture of experts (Megatron names; docs/moe.md)")
    g.add_argument("--num-experts", type=int, help="experts per layer (ModelConfig.num_experts; " +
                   ("replaces every dense MLP)" if architecture else "must equal the checkpoint's)"))
    g.add_argument("--moe-router-topk", type=int, help="experts per token (ModelConfig.moe_top_k; default 2)")
    g.add_argument("--moe-aux-loss-coeff", type=float,
                   help="Megatron's per-layer load-balancing loss (switch form, E/k sum f_e P_e, summed over layers) "
                        "with this weight")
    g.add_argument("--moe-z-loss-coeff", type=float, help="router z-loss weight")
    g.add_argument("--moe-expert-capacity-factor", type=float,
                   help="each expert keeps at most ceil(tokens x k / E x factor) token-expert pairs (default: "
                        "dropless)")
    g.add_argument("--moe-token-drop-policy", choices=("probs", "position"),
                   help="with a capacity: keep the highest router weights (probs, default) or the earliest tokens")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="Megatron pads each expert's rows to the capacity (static shapes, padding discarded): the "
                        "same numbers; needs --moe-expert-capacity-factor (noted in the log)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="the grouped-matmul MoE kernels (pmodel.ops.kernels_for(grouped_gemm=True)); refused where "
                        "the device's backend has none")


def moe_overrides(args) -> dict:
    """The ModelConfig MoE fields the MoE flags set (only those given)."""
    out = {}
    for flag, field in (("num_experts", "num_experts"), ("moe_router_topk", "moe_top_k"),
                        ("moe_aux_loss_coeff", "moe_aux_loss_coeff"), ("moe_z_loss_coeff", "moe_z_loss_coeff"),
                        ("moe_expert_capacity_factor", "moe_capacity_factor"),
                        ("moe_token_drop_policy", "moe_drop_policy")):
        v = getattr(args, flag, None)
        if v is not None:
            out[field] = v
    if getattr(args, "moe_aux_loss_coeff", None) is not None:
        out["moe_aux_loss_type"] = "per_layer"  # Megatron's switch_load_balancing_loss_func, per layer
    return out


def validate_moe(args, prog: str) -> None:
    no = lambda m: refuse(prog, m)  # noqa: E731
    moe_given = [f for f in ("moe_router_topk", "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_expert_capacity_factor",
                             "moe_token_drop_policy") if getattr(args, f, None) is not None]
    if args.num_experts is not None and args.num_experts < 1:
        no(f"--num-experts must be >= 1, got {args.num_experts}")
    if args.moe_pad_expert_input_to_capacity and args.moe_expert_capacity_factor is None:
        no("--moe-pad-expert-input-to-capacity pads to the capacity of --moe-expert-capacity-factor; without it "
           "routing is dropless and there is no capacity to pad to")
    if args.moe_token_drop_policy is not None and args.moe_expert_capacity_factor is None:
        no("--moe-token-drop-policy chooses which pairs a full expert drops: it needs --moe-expert-capacity-factor "
           "(without it routing is dropless)")
    if args.expert_model_parallel_size < 1:
        no(f"--expert-model-parallel-size must be >= 1, got {args.expert_model_parallel_size}")
    return moe_given


def add_loop_flags(ap, *, log_interval=100, checkpoints=True) -> None:
    """Loop flags; ``checkpoints=False`` leaves ``--save`` / ``--load`` / ``--save-interval`` to the
    script (finetune.py saves adapters / HF checkpoints, not training checkpoints)."""
    g = ap.add_argument_group("loop, checkpoints and logging")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)
    if checkpoints:
        g.add_argument("--save", help="checkpoint root")
        g.add_argument("--load", help="resume from the latest checkpoint under this root (any parallel layout)")
        g.add_argument("--save-interval", type=int)
        g.add_argument("--no-load-optim", action="store_true",
                       help="--load reads the parameters only; the optimizer starts fresh from them (needed for a "
                            "checkpoint converted from Hugging Face, which holds no optimizer state)")
        g.add_argument("--no-load-rng", action="store_true", help="--load keeps this run's seeds")
        g.add_argument("--load-if-exists", action="store_true",
                       help="--load may name a folder without a checkpoint (the run then starts from scratch); "
                            "without it that is refused unless --load equals --save (the auto-resume pattern)")
        g.add_argument("--no-verify-checksums", action="store_true",
                       help="--load skips checking each checkpoint file against the sha256 in its manifest")
        g.add_argument("--finetune", action="store_true",
                       help="--load the parameters only and start at iteration 0 (no optimizer, RNG, position)")
    g.add_argument("--log-interval", type=int, default=log_interval)
    g.add_argument("--eval-interval", type=int)
    g.add_argument("--eval-iters", type=int, help="batches per evaluation (needs --eval-interval; default 100; "
                                                  "0 = no evaluation, as Megatron)")
    g.add_argument("--metrics-file", help="JSON-lines metrics (default: <save>/metrics.jsonl when --save)")
    g.add_argument("--peak-tflops", type=float, help="peak TFLOP/s of one device, to report MFU")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="stop with an error after this many consecutive steps whose loss or gradient norm is "
                        "non-finite (their updates are skipped; nothing is saved for them); 0 = never stop")


def add_profile_flags(ap) -> None:
    g = ap.add_argument_group("profiling (ModelLink names; torch.profiler on cpu/cuda, torch_npu.profiler on npu)")
    g.add_argument("--profile", action="store_true", help="record a window of steps: a Chrome trace per profiled rank "
                                                          "and a printed table of the most expensive ops")
    g.add_argument("--profile-step-start", type=int, default=0,
                   help="first recorded step, numbered like Megatron's iteration (0 = the first step; the log line "
                        "'iter k+1' reports step k)")
    g.add_argument("--profile-step-end", type=int, default=-1,
                   help="first step not recorded (exclusive); -1 = through the last step")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="global ranks to profile; -1 = all")
    g.add_argument("--profile-level", choices=("level0", "level1", "level2"), default="level0",
                   help="level0: op / kernel timeline; level1: + FLOPs (NPU: AscendCL, AI Core metrics); "
                        "level2: NPU only (+ runtime, AI CPU)")
    g.add_argument("--profile-with-cpu", action="store_true", help="accelerator runs: also record CPU-side ops")
    g.add_argument("--profile-with-stack", action="store_true", help="record Python stacks")
    g.add_argument("--profile-with-memory", action="store_true", help="record tensor allocations")
    g.add_argument("--profile-record-shapes", action="store_true", help="record operator input shapes")
    g.add_argument("--profile-save-path", default="./profile", help="output folder")


def profile_config(args, prog: str):
    """The :class:`pmodel.profiling.ProfileConfig` of the flags, or None without --profile."""
    if not getattr(args, "profile", False):
        return None
    from pmodel.profiling import ProfileConfig
    end = args.train_iters if args.profile_step_end == -1 else args.profile_step_end
    try:
        return ProfileConfig(step_start=args.profile_step_start, step_end=end, level=args.profile_level,
                             with_cpu=args.profile_with_cpu, with_stack=args.profile_with_stack,
                             with_memory=args.profile_with_memory, record_shapes=args.profile_record_shapes,
                             save_path=args.profile_save_path)
    except ValueError as e:
        refuse(prog, profile_message(str(e)))


def profile_message(msg: str) -> str:
    for k, f in (("ProfileConfig.step_start", "--profile-step-start"), ("ProfileConfig.step_end", "--profile-step-end"),
                 ("step_start", "--profile-step-start"), ("step_end", "--profile-step-end"),
                 ("with_cpu", "--profile-with-cpu"), ("level2", "--profile-level level2"),
                 ("ProfileConfig.level", "--profile-level"), ("StepProfiler: ", "")):
        msg = msg.replace(k, f)
    return msg


def validate_profile(args, prog: str, device_type: str, world: int) -> None:
    """Refuse profiling flags that could not take effect."""
    if not hasattr(args, "profile"):
        return
    d = {"profile_step_start": 0, "profile_step_end": -1, "profile_ranks": [0], "profile_level": "level0",
         "profile_with_cpu": False, "profile_with_stack": False, "profile_with_memory": False,
         "profile_record_shapes": False, "profile_save_path": "./profile"}
    if not args.profile:
        given = ["--" + k.replace("_", "-") for k, v in d.items() if getattr(args, k) != v]
        if given:
            refuse(prog, f"{', '.join(given)} configure --profile; without it nothing is profiled")
        return
    end = args.train_iters if args.profile_step_end == -1 else args.profile_step_end
    if end > args.train_iters:
        refuse(prog, f"--profile-step-end {end}: the run stops after --train-iters {args.train_iters} steps, so "
                     f"steps {args.train_iters}..{end - 1} would never be recorded")
    cfg = profile_config(args, prog)
    bad = [r for r in args.profile_ranks if r != -1 and not 0 <= r < world]
    if bad or (-1 in args.profile_ranks and len(args.profile_ranks) > 1):
        refuse(prog, f"--profile-ranks {' '.join(map(str, args.profile_ranks))}: ranks must be in 0..{world - 1} "
                     "(or -1 alone for every rank)")
    from pmodel.profiling import profile_problems
    problems = profile_problems(cfg, device_type)
    if problems:
        refuse(prog, profile_message("; ".join(problems)).replace("on cpu", "on --device cpu"))


def profiler_of(args, launch):
    """This rank's :class:`pmodel.profiling.StepProfiler`, or None (not profiling / not a profiled rank)."""
    cfg = profile_config(args, launch.prog)
    if cfg is None or not (-1 in args.profile_ranks or launch.rank in args.profile_ranks):
        return None
    from pmodel.profiling import StepProfiler
    try:
        return StepProfiler(cfg, rank=launch.rank, device_type=launch.device.type)
    except (ValueError, RuntimeError) as e:
        refuse(launch.prog, profile_message(str(e)))


# ----------------------------------------------------------------------------- checks
def validate_common(args, prog: str) -> None:
    """Refuse shared flag combinations that could not take effect."""
    def no(msg):
        refuse(prog, msg)
    notes = args.__dict__.setdefault("notes", [])
    if args.bf16 and args.fp16:
        no("--bf16 and --fp16 are exclusive")
    for flag in ("micro_batch_size", "global_batch_size", "log_interval", "train_iters", "save_interval",
                 "eval_interval", "eval_iters", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "max_nonfinite_steps"):
        v = getattr(args, flag, None)
        lo = 0 if flag in ("train_iters", "eval_iters", "max_nonfinite_steps") else 1
        if v is not None and v < lo:
            no(f"--{flag.replace('_', '-')} must be >= {lo}, got {v}")
    validate_megatron(args, prog, notes)
    if args.global_batch_size and args.micro_batch_size and args.global_batch_size % args.micro_batch_size:
        no(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
           f"{args.micro_batch_size}")
    if args.use_mc2 and not args.sequence_parallel:
        no("--use-mc2 fuses the sequence-parallel all-gather / reduce-scatter with the matmuls: it needs "
           "--sequence-parallel")
    if args.clip_grad < 0:
        no(f"--clip-grad must be >= 0 (0 disables clipping), got {args.clip_grad}")
    if args.eval_iters is not None and not args.eval_interval:
        no("--eval-iters sets the batches per evaluation; without --eval-interval nothing is evaluated")
    if args.lr_decay_iters is not None and args.lr_decay_style not in ("linear", "cosine"):
        no(f"--lr-decay-iters: --lr-decay-style {args.lr_decay_style} has no decay length (only linear and cosine do)")
    if args.lr_decay_style == "constant" and args.min_lr != 0.0:
        no("--min-lr is the floor of a decaying schedule; --lr-decay-style constant never uses it")
    if args.lr_decay_style in ("linear", "cosine") and args.lr_warmup_fraction is None and \
            (args.lr_decay_iters or args.train_iters) <= args.lr_warmup_iters:
        no(f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay length "
           f"{args.lr_decay_iters or args.train_iters} for --lr-decay-style {args.lr_decay_style}")
    if (args.initial_loss_scale is not None or args.loss_scale_window is not None) and not args.fp16:
        if not args.bf16:
            no("--initial-loss-scale / --loss-scale-window need --fp16 (bf16 and fp32 train without loss scaling)")
        given = " ".join(f for f, v in (("--initial-loss-scale", args.initial_loss_scale),
                                        ("--loss-scale-window", args.loss_scale_window)) if v is not None)
        notes.append(f"{given}: --bf16 trains without loss scaling (as Megatron, which reads it for --fp16 only)")
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            no("--lr-warmup-fraction and --lr-warmup-iters both set the warmup; give one (Megatron asserts the same)")
        if not 0.0 <= args.lr_warmup_fraction < 1.0:
            no(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    if args.accumulate_allreduce_grads_in_fp32 and not (args.bf16 or args.fp16):
        no("--accumulate-allreduce-grads-in-fp32 needs --bf16 or --fp16 (fp32 gradients already are fp32)")
    if getattr(args, "save_interval", None) is not None and not args.save:
        no("--save-interval needs --save")
    for flag in ("no_load_optim", "no_load_rng", "finetune"):
        if getattr(args, flag, False) and not args.load:
            no(f"--{flag.replace('_', '-')} says what --load reads; it needs --load")
    if args.tokenizer_model and args.tokenizer_name_or_path:
        no("give one of --tokenizer-model and --tokenizer-name-or-path (both name the tokenizer)")
    tok = args.tokenizer_model or args.tokenizer_name_or_path
    if args.tokenizer_type == "ByteTokenizer" and tok:
        no(f"--tokenizer-type ByteTokenizer reads no file; drop {tok} or pick the type that reads it")
    if args.tokenizer_type and not tok and TOKENIZER_TYPES[args.tokenizer_type] != "bytes":
        no(f"--tokenizer-type {args.tokenizer_type} needs --tokenizer-name-or-path or --tokenizer-model")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        # Megatron (arguments.py) switches sequence parallelism off at TP 1, where it would shard over a
        # group of one rank: the same numbers. ModelLink's TP1 x PP2 script passes it.
        args.sequence_parallel = False
        notes.append("--sequence-parallel: off at --tensor-model-parallel-size 1 (as Megatron: the TP group has one "
                     "rank, nothing to shard)")
    if args.use_mc2 and not args.sequence_parallel:
        no("--use-mc2 fuses the sequence-parallel all-gather / reduce-scatter with the matmuls: it needs "
           "--sequence-parallel at --tensor-model-parallel-size > 1")
    if args.enable_high_availability and not args.use_distributed_optimizer:
        no("--enable-high-availability (replica optimizer) needs --use-distributed-optimizer")
    if args.distributed_timeout_minutes is not None and not args.distributed_timeout_minutes > 0:
        no(f"--distributed-timeout-minutes must be positive, got {args.distributed_timeout_minutes}")
    if args.enable_optimizer_state_local_copy:
        if not args.enable_high_availability:
            no("--enable-optimizer-state-local-copy serves the failure checkpoint of --enable-high-availability; "
               "add it")
        if not getattr(args, "save", None):
            no("--enable-optimizer-state-local-copy: the failure checkpoint it serves is written into --save, "
               f"which {prog} " + ("was not given" if hasattr(args, "save") else "does not have (it writes no "
                                   "training checkpoints)"))
        if args.distributed_timeout_minutes is None:
            no("--enable-optimizer-state-local-copy needs --distributed-timeout-minutes: a survivor blocked in a "
               "collective with a dead peer must give up well before the launcher kills it (torchrun sends SIGKILL "
               "30 s after SIGTERM), e.g. --distributed-timeout-minutes 0.25")
    if args.integrity_checksum and not args.enable_high_availability:
        no("--integrity-checksum compares the replica optimizer's two copies of each shard: it needs "
           "--enable-high-availability")
    if args.integrity_max_redo is not None:
        if not (args.integrity_check or args.integrity_checksum):
            no("--integrity-max-redo needs --integrity-check or --integrity-checksum")
        if args.integrity_max_redo < 1:
            no(f"--integrity-max-redo must be >= 1, got {args.integrity_max_redo}")
    pp, v = args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage
    if pp == 1:
        for flag, val in (("--num-layer-list", args.num_layer_list),
                          ("--num-layers-per-virtual-pipeline-stage", v), ("--pipeline-schedule", args.pipeline_schedule)):
            if val is not None:
                no(f"{flag} needs --pipeline-model-parallel-size > 1")
    if args.num_layer_list is not None:
        try:
            [int(x) for x in args.num_layer_list.split(",")]
        except ValueError:
            no(f"--num-layer-list {args.num_layer_list!r}: expected comma-separated integers, e.g. 1,3")
        if v is not None:
            no("--num-layer-list and --num-layers-per-virtual-pipeline-stage: a virtual stage size is one number for "
               "every rank, an uneven split is not; give one of them")
    if v is not None and v < 1:
        no(f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {v}")
    if args.pipeline_schedule == "interleaved" and v is None:
        no("--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage (the model chunks each "
           "rank interleaves)")
    if args.pipeline_schedule in ("1f1b", "zero-bubble") and v is not None:
        no(f"--num-layers-per-virtual-pipeline-stage makes virtual stages, which only the interleaved schedule "
           f"runs; --pipeline-schedule {args.pipeline_schedule} would ignore them")
    validate_profile(args, prog, device_of(args, prog).type, world_size())
    ep = args.expert_model_parallel_size
    if world_size() == 1 and (args.tensor_model_parallel_size > 1 or pp > 1 or args.overlap_grad_reduce or ep > 1):
        no("tensor / pipeline / data parallel flags need one process per rank: launch with torchrun, e.g. "
           f"python -m torch.distributed.run --nproc-per-node 2 {prog} ...")


def validate_megatron(args, prog: str, notes: list) -> None:
    """The Megatron switches of :func:`add_megatron_flags` and the launcher / backend flags."""
    def no(msg):
        refuse(prog, msg)
    for flag in ("hidden_dropout", "attention_dropout"):
        v = getattr(args, flag, None)
        if v is not None and v != 0.0:
            no(f"--{flag.replace('_', '-')} {v}: pmodel's decoder has no dropout (only 0 is accepted); training with "
               "it would change the results")
    if getattr(args, "attention_softmax_in_fp32", False):
        notes.append("--attention-softmax-in-fp32: every attention path here (reference, SDPA / flash, NPU fusion "
                     "attention) takes the softmax in fp32 already")
    if getattr(args, "no_masked_softmax_fusion", False):
        notes.append("--no-masked-softmax-fusion: pmodel has no Megatron scale-mask-softmax kernel; attention runs "
                     "as --use-flash-attn says")
    if getattr(args, "no_gradient_accumulation_fusion", False):
        notes.append("--no-gradient-accumulation-fusion: pmodel has no fused weight-gradient accumulation kernel; "
                     "weight gradients are computed in the parameter dtype, then accumulated (fp32 buffers with "
                     "--accumulate-allreduce-grads-in-fp32), which is what this flag asks for")
    if getattr(args, "jit_compile", False) and device_of(args, prog).type != "npu":
        notes.append("--jit-compile: torch_npu's operator compile mode, an NPU setting; nothing to switch on "
                     f"{device_of(args, prog).type}")
    if args.tokenizer_not_use_fast and args.tokenizer_type == "ByteTokenizer":
        no("--tokenizer-not-use-fast: ByteTokenizer has no fast / slow variants")
    if world_size() == 1 and args.distributed_backend is not None:
        notes.append(f"--distributed-backend {args.distributed_backend}: one process, no process group to create")
    if hasattr(args, "num_experts"):
        validate_moe(args, prog)


def device_of(args, prog: str) -> torch.device:
    """The device of the flags: --device, else the one --distributed-backend implies (ModelLink's
    scripts name only the backend), else cpu. A backend that cannot serve the device is refused."""
    import importlib.util
    backend, dev = getattr(args, "distributed_backend", None), getattr(args, "device", None)
    npu_here = importlib.util.find_spec("torch_npu") is not None
    if dev is None:
        if backend == "nccl":
            if torch.cuda.is_available():
                dev = "cuda"
            elif npu_here:
                dev = "npu"  # torch_npu maps the nccl backend to hccl (what ModelLink's scripts rely on)
            else:
                refuse(prog, "--distributed-backend nccl: no CUDA device (nor torch_npu) here; on CPU use "
                             "--distributed-backend gloo")
        elif backend == "hccl":
            dev = "npu"
        else:
            dev = "cpu"
    d = torch.device(dev)
    ok = {"gloo": ("cpu",), "nccl": ("cuda", "npu"), "hccl": ("npu",)}
    if backend is not None and d.type not in ok[backend]:
        refuse(prog, f"--distributed-backend {backend} cannot run --device {d.type} tensors (it serves "
                     f"{' / '.join(ok[backend])}); use --distributed-backend "
                     f"{ {'cpu': 'gloo', 'cuda': 'nccl', 'npu': 'hccl'}.get(d.type, 'gloo') }")
    return d


def backend_of(args, device: torch.device) -> str | None:
    """The process-group backend (nccl on an NPU means hccl, as torch_npu maps it)."""
    b = getattr(args, "distributed_backend", None)
    if b == "nccl" and device.type == "npu":
        return "hccl"
    return b


def say_notes(args, launch) -> None:
    """Each documented no-op once, on the lead rank."""
    said = launch.__dict__.setdefault("notes_said", set())  # on the launch: args may be dumped as JSON
    for n in dict.fromkeys(args.__dict__.get("notes", [])):
        if n not in said:
            said.add(n)
            launch.say(f"note: {n}")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------- builders
def load_tokenizer(args, *, default=None, vocab_size=None, slow: bool = False):
    """The tokenizer named by the flags (or ``default``, e.g. the HF checkpoint folder), or None."""
    path = args.tokenizer_model or args.tokenizer_name_or_path or default
    if path is None and args.tokenizer_type != "ByteTokenizer":
        return None
    kind = TOKENIZER_TYPES[args.tokenizer_type] if args.tokenizer_type else "auto"
    return pmodel.data.load_tokenizer(path, kind=kind, vocab_size=vocab_size, use_fast=not slow)


def dtype_of(args) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def policy_of(args, dtype: torch.dtype | None = None) -> Policy:
    """The precision policy: ``dtype`` (default from --bf16 / --fp16) with fp32 main weights, loss
    scaling for fp16."""
    dtype = dtype or dtype_of(args)
    scale = None
    if dtype == torch.float16:
        kw = {}
        if args.initial_loss_scale is not None:
            kw["initial"] = args.initial_loss_scale
        if args.loss_scale_window is not None:
            kw["growth_interval"] = args.loss_scale_window
        scale = LossScale(**kw)
    return Policy(param_dtype=dtype, grad_accum_fp32=args.accumulate_allreduce_grads_in_fp32,
                  loss_scale=scale)


def optimizer_of(args) -> tuple:
    """``(tx, max_grad_norm)``: AdamW on Megatron's schedule; the clip goes to the plan."""
    decay = args.lr_decay_iters or args.train_iters
    warmup = args.lr_warmup_iters
    if getattr(args, "lr_warmup_fraction", None) is not None:
        warmup = args.lr_warmup_fraction * decay  # Megatron: not rounded
    sched = optim.megatron(lr=args.lr, min_lr=args.min_lr, warmup_steps=warmup,
                           decay_steps=decay if args.lr_decay_style in ("linear", "cosine") else None,
                           style=args.lr_decay_style)
    tx = optim.adamw(sched, args.adam_beta1, args.adam_beta2, args.adam_eps, args.weight_decay)
    return tx, (args.clip_grad if args.clip_grad > 0 else None)


def kernels_of(args, device: torch.device, prog: str):
    """The kernel policy from the fusion flags; a fusion the device's backend lacks is refused."""
    # A flag left out means "the backend's default" (fused where it has the kernel; MC2 off).
    asked = {"flash_attn": args.use_flash_attn or None, "fused_rmsnorm": args.use_fused_rmsnorm or None,
             "fused_swiglu": args.use_fused_swiglu or None, "fused_rotary": args.use_fused_rotary_pos_emb or None,
             "mc2": args.use_mc2 or None, "grouped_gemm": getattr(args, "moe_grouped_gemm", False) or None}
    try:
        return pmodel.ops.kernels_for(backend=device.type, **asked)
    except ValueError as e:
        refuse(prog, flag_message(str(e)))


class Launch:
    """This process in the launch: rank, world size, device, and the mesh once built."""

    def __init__(self, args, prog: str):
        self.rank, self.world = int(os.environ.get("RANK", "0")), world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", args.__dict__.get("local_rank") or 0))
        dev = device_of(args, prog)
        if dev.type != "cpu" and dev.index is None:
            dev = torch.device(dev.type, self.local_rank)
        self.device = dev
        self.prog = prog
        self.mesh = None
        minutes = getattr(args, "distributed_timeout_minutes", None)
        self.timeout_s = minutes * 60.0 if minutes is not None else None
        self.backend = backend_of(args, dev)
        if getattr(args, "use_deter_comp", False):
            self.deterministic(args.seed)
        if getattr(args, "jit_compile", False) and dev.type == "npu":
            import torch_npu  # noqa: F401  (an NPU run imports it anyway)
            torch.npu.set_compile_mode(jit_compile=True)
        say_notes(args, self)

    def deterministic(self, seed: int) -> None:
        """--use-deter-comp: the environment the device libraries read when they start (set here,
        before any of them does), then :func:`pmodel.device.set_deterministic`."""
        need = {"cuda": {"CUBLAS_WORKSPACE_CONFIG": (":4096:8", ":16:8")},
                "npu": {"HCCL_DETERMINISTIC": ("true", "True", "1")}}.get(self.device.type, {})
        for var, ok in need.items():
            if os.environ.get(var, ok[0]) not in ok:
                refuse(self.prog, f"--use-deter-comp: {var}={os.environ[var]} is not deterministic; unset it or "
                                  f"use {ok[0]}")
            os.environ[var] = os.environ.get(var, ok[0])
        pmodel.device.set_deterministic(seed, self.device)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        if self.lead:
            print(msg, flush=True)

    def layout(self, args, cfg) -> dict:
        """Sizes from the flags, checked against the world size and the model before any group exists."""
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        ep = getattr(args, "expert_model_parallel_size", 1)
        no = lambda m: refuse(self.prog, m)  # noqa: E731
        if ep > 1 and not cfg.num_experts:
            no(f"--expert-model-parallel-size {ep} splits the experts of a mixture-of-experts model; this model is "
               "dense (give --num-experts)")
        if self.world % (tp * pp * ep):
            no(f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}"
               + (f" x --expert-model-parallel-size {ep}" if ep > 1 else "")
               + f" = {tp * pp * ep} does not divide the world size {self.world}")
        dp = self.world // (tp * pp * ep)
        # The ep ranks read different micro-batches (Megatron's expert-data-parallel ranks are data-
        # parallel ranks): the data is split over dp x ep.
        nd = dp * ep
        gbs = args.global_batch_size or args.micro_batch_size * nd
        if gbs % (args.micro_batch_size * nd):
            no(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {args.micro_batch_size} x "
               f"data-parallel size {dp}" + (f" x --expert-model-parallel-size {ep}" if ep > 1 else ""))
        k = gbs // (args.micro_batch_size * nd)
        V, nl = 1, args.num_layers_per_virtual_pipeline_stage
        if nl is not None:
            if cfg.num_layers % (pp * nl):
                no(f"--num-layers-per-virtual-pipeline-stage {nl}: {cfg.num_layers} layers do not split into "
                   f"{pp} pipeline stages of chunks of {nl} layers")
            V = cfg.num_layers // (pp * nl)
            if V < 2:
                no(f"--num-layers-per-virtual-pipeline-stage {nl} gives each of the {pp} stages one chunk of "
                   f"{cfg.num_layers // pp} layers; the interleaved schedule needs at least 2 chunks per stage")
        schedule = args.pipeline_schedule or ("interleaved" if V > 1 else "1f1b")
        if schedule == "interleaved" and k % pp:
            no(f"--pipeline-schedule interleaved needs the micro-batches per data-parallel rank ({k} = global batch "
               f"{gbs} / (micro batch {args.micro_batch_size} x dp {dp})) to be a multiple of "
               f"--pipeline-model-parallel-size {pp} (Megatron's requirement)")
        lps = tuple(int(x) for x in args.num_layer_list.split(",")) if args.num_layer_list else None
        if lps is not None and len(lps) != pp:
            no(f"--num-layer-list {args.num_layer_list} has {len(lps)} entries; expected one per pipeline stage "
               f"(--pipeline-model-parallel-size {pp})")
        lay = {"tp": tp, "pp": pp, "dp": dp, "ep": ep, "global_batch": gbs, "microbatches": k, "schedule": schedule,
               "virtual_stages": V, "layers_per_stage": lps}
        # The library's own rules, checked on every rank before any process group exists.
        from pmodel.parallel.plan import layout_problems
        problems = layout_problems(cfg, lay, pipeline=self.pipeline_spec(lay), sequence_parallel=args.sequence_parallel,
                                   distributed_optimizer=args.use_distributed_optimizer,
                                   overlap_grad_reduce=args.overlap_grad_reduce,
                                   high_availability=args.enable_high_availability,
                                   policy=policy_of(args, cfg.dtype))
        if problems:
            no(flag_message("; ".join(problems)))
        return lay

    @staticmethod
    def pipeline_spec(lay: dict):
        if lay["pp"] == 1:
            return None
        return PipelineSpec(schedule=lay["schedule"], layers_per_stage=lay["layers_per_stage"],
                            virtual_stages=lay["virtual_stages"])

    def build_mesh(self, lay: dict) -> Mesh:
        if self.world == 1:
            self.mesh = Mesh.single()
        else:
            if "MASTER_ADDR" not in os.environ:
                refuse(self.prog, "WORLD_SIZE > 1 without MASTER_ADDR: launch with torch.distributed.run")
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            timeout = self.timeout_s
            kw = {"timeout_s": timeout} if timeout is not None else {}
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                # torch.distributed.run keeps one store across restarts: rendezvous under a prefix
                # of this attempt, or a restarted job finds the previous attempt's gloo addresses.
                import torch.distributed as dist
                kw["store"] = dist.PrefixStore(f"pmodel/{self.attempt}", self._agent_store())
            init_distributed(rank=self.rank, world_size=self.world, device_type=self.device.type,
                             backend=self.backend, **kw)
            self.mesh = Mesh.build(tp=lay["tp"], pp=lay["pp"], ep=lay.get("ep", 1), timeout_s=timeout)
        return self.mesh

    @property
    def attempt(self) -> str:
        return f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def _agent_store(self):
        import datetime

        import torch.distributed as dist
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=max(60.0, self.timeout_s or 0.0)),
                             wait_for_workers=False)

    def store(self):
        """The key-value store the failure checkpoint coordinates over, and a key prefix unique to
        this launch attempt. Under torch.distributed.run it is the agent's store, which outlives
        every rank; otherwise the default group's (hosted by rank 0: a failure of rank 0 takes it
        along, and no failure checkpoint is written then)."""
        import torch.distributed as dist
        prefix = f"pmodel-ha/{self.attempt}"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return self._agent_store(), prefix, True
        return dist.distributed_c10d._get_default_store(), prefix, False

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def build_plan(args, launch: Launch, model, tx, lay: dict, *, max_grad_norm, policy, hook=None):
    """:func:`pmodel.parallel.parallelize` from the flags (library refusals shown with flag names)."""
    spec = launch.pipeline_spec(lay)
    try:
        with warnings.catch_warnings():
            if not launch.lead:
                warnings.simplefilter("ignore")
            return parallelize(model, tx, launch.mesh, pipeline=spec, sequence_parallel=args.sequence_parallel,
                               distributed_optimizer=args.use_distributed_optimizer,
                               overlap_grad_reduce=args.overlap_grad_reduce,
                               high_availability=args.enable_high_availability, max_grad_norm=max_grad_norm,
                               policy=policy, micro_batch_hook=hook,
                               deterministic=getattr(args, "use_deter_comp", False))
    except (ValueError, NotImplementedError) as e:
        refuse(launch.prog, flag_message(str(e)))


def check_save_folder(args, cfg_dict: dict, prog: str) -> None:
    """Refuse ``--save`` into a folder whose checkpoints belong to another model config (unless this
    run resumed from that very folder): new checkpoints would mix with, and ``latest`` would
    replace, another run's."""
    import json

    from pmodel.checkpoint.state import config_diff, latest
    d = latest(args.save)
    if d is None:
        return
    if getattr(args, "load", None) and Path(args.load).resolve() == Path(args.save).resolve():
        return  # resuming in place: the load already checked the config
    try:
        saved = json.loads((d / "manifest.json").read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return  # not readable as ours: the save's own atomic write does not touch it
    diff = config_diff(saved, cfg_dict)
    if diff:
        refuse(prog, f"--save {args.save} already holds checkpoints of another model config ({d.name}: "
                     f"{'; '.join(diff[:3])}); save into a new folder, or --load it to continue that run")


def run(args, launch: Launch, plan, params, opt_state, train_data, *, eval_data=None, config=None, extra=None,
        save=None):
    """Resume (``--load``), then :func:`pmodel.train.train` with checkpoints every
    ``--save-interval`` and at the end (``save`` overrides what a save writes).
    Returns ``(params, opt_state, state, history)``."""
    from pmodel.checkpoint.state import CheckpointError
    from pmodel.train import LoopConfig, NonFiniteError, TrainState, train
    cfg_dict = plan.model.config.to_dict()
    state = TrainState()
    if getattr(args, "load", None):
        params_only = args.no_load_optim or args.finetune
        try:
            got = plan.load_checkpoint(args.load, params, None if params_only else opt_state, config=cfg_dict,
                                       restore_rng_state=not (args.no_load_rng or args.finetune), cast_dtype=True,
                                       verify=not getattr(args, "no_verify_checksums", False))
        except CheckpointError as e:
            msg = str(e)
            if "no optimizer state" in msg or "no optimizer-state" in msg:
                msg += " (a checkpoint converted from Hugging Face holds parameters only: add --no-load-optim)"
            refuse(launch.prog, msg)
        if got is None:
            check_fresh_start(args, launch.prog)
            launch.say(f"no checkpoint under --load {args.load}; starting from scratch")
        else:
            params, loaded_state, man = got
            if params_only:
                opt_state = plan.tx.init(params)  # fp32 main weights from the loaded params
            else:
                opt_state = loaded_state
            if not args.finetune:
                state = TrainState(step=man["step"], consumed_samples=int((man["data"] or {}).get("consumed_samples", 0)))
            if man["rng_restored"]:
                note = ""
            elif args.no_load_rng or args.finetune:
                note = " (RNG states not restored: --no-load-rng / --finetune)"
            elif not man["same_layout"]:
                note = " (saved under another layout: resharded; RNG states not restored)"
            else:
                note = " (the checkpoint holds no RNG states: this run keeps its own seeds)"
            if man.get("cast_from"):
                note += f" (parameters cast from {man['cast_from']})"
            launch.say(f"{'loaded' if args.finetune else 'resumed from'} {man['dir']} at iteration {state.step} "
                       f"({state.consumed_samples} samples consumed){' parameters only' if params_only else ''}{note}")
    if save is None and getattr(args, "save", None):
        check_save_folder(args, cfg_dict, launch.prog)
    ckpt_save = None
    if save is None and getattr(args, "save", None):
        def save(st, p, o, writer=None):
            return plan.save_checkpoint(args.save, st.step, p, o, config=cfg_dict,
                                        data={"consumed_samples": st.consumed_samples}, extra=extra, writer=writer)
        ckpt_save = save
    resilience = resilience_of(args, launch, plan, ckpt_save)
    metrics = args.metrics_file or (str(Path(args.save) / "metrics.jsonl") if getattr(args, "save", None) else None)
    eval_iters = 100 if args.eval_iters is None else args.eval_iters
    if eval_iters == 0:
        eval_data = None  # Megatron: --eval-iters 0 evaluates nothing
    loop = LoopConfig(train_iters=args.train_iters, log_interval=args.log_interval,
                      eval_interval=args.eval_interval if eval_data is not None else None,
                      eval_iters=eval_iters or 1, save_interval=args.save_interval, metrics_path=metrics,
                      progress=not args.no_progress, peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
                      world_size=launch.world,
                      max_nonfinite_steps=getattr(args, "max_nonfinite_steps", 10) or None)
    try:
        return train(plan.step, params, opt_state, train_data, loop=loop,
                     evaluate=plan.evaluate if eval_data is not None else None, eval_data=eval_data, save=save,
                     state=state, config=config, lead=launch.lead, profiler=profiler_of(args, launch),
                     resilience=resilience)
    except NonFiniteError as e:
        refuse(launch.prog, str(e))


def check_fresh_start(args, prog: str) -> None:
    """``--load`` named a folder without a checkpoint: refused (a typo would otherwise start from
    scratch and overwrite ``--save``) unless ``--load-if-exists`` or ``--load`` equals ``--save``
    (auto-resume: the first launch finds nothing)."""
    if getattr(args, "load_if_exists", False):
        return
    save = getattr(args, "save", None)
    if save and Path(save).resolve() == Path(args.load).resolve():
        return
    what = "does not exist" if not Path(args.load).exists() else "holds no checkpoint"
    refuse(prog, f"--load {args.load} {what}; give --load-if-exists to start from scratch when there is none")


def resilience_of(args, launch: Launch, plan, ckpt_save):
    """The :class:`pmodel.resilience.Resilience` of the flags (None without any): the integrity
    check (--integrity-check / --integrity-checksum) and, with --enable-high-availability and
    --save, the failure checkpoint (SIGTERM handled: it becomes a stop at the next step boundary)."""
    from pmodel.resilience import FailureCheckpoint, IntegrityConfig, Resilience
    integrity = None
    if args.integrity_check or args.integrity_checksum:
        integrity = IntegrityConfig(nonfinite=args.integrity_check, checksum=args.integrity_checksum,
                                    max_redo=args.integrity_max_redo or 1)
    failure = None
    if args.enable_high_availability and ckpt_save is not None:
        store, prefix, agent = launch.store()
        if not agent:
            launch.say("high availability: not launched by torch.distributed.run, so the failure checkpoint "
                       "coordinates over rank 0's store (a failure of rank 0 leaves no failure checkpoint)")
        if launch.timeout_s is None:
            launch.say("high availability: without --distributed-timeout-minutes a survivor blocked in a collective "
                       "with a dead peer waits torch's default timeout (30 minutes on gloo), longer than a "
                       "launcher's grace before SIGKILL (torchrun: 30 s): only the dead rank's direct peers may get "
                       "to write the failure checkpoint")
        failure = FailureCheckpoint(plan, ckpt_save, store=store, prefix=prefix,
                                    peer_timeout_s=launch.timeout_s or 1800.0,
                                    local_copy=args.enable_optimizer_state_local_copy)
    if integrity is None and failure is None:
        return None
    res = Resilience(plan, integrity=integrity, failure=failure)
    if failure is not None:
        res.install_signal_handlers()
    return res


def check_token_ids(mb: dict, vocab_size: int | None, prog: str, what: str = "training data") -> dict:
    """Refuse a micro-batch whose token or label ids do not fit the model's vocabulary (the
    embedding would fail with a bare IndexError, or a device assert on an accelerator)."""
    if vocab_size is None:
        return mb
    for key in ("tokens", "labels"):
        t = mb.get(key)
        if t is None or not t.numel():
            continue
        hi = int(t.max())
        lo = int(t[t != -100].min()) if key == "labels" and bool((t != -100).any()) else int(t.min())
        if hi >= vocab_size or lo < 0:
            bad = hi if hi >= vocab_size else lo
            refuse(prog, f"{what}: token id {bad} in the {key} does not fit the model's vocabulary of {vocab_size} "
                         f"(ids 0..{vocab_size - 1}; max id in the batch {hi}): data tokenized with another "
                         "tokenizer, or a wrong --vocab-size?")
    return mb


def loader(dataset, args, launch: Launch, lay: dict, collator, to_batch, *, num_samples=None,
           vocab_size: int | None = None):
    """``start -> iterator`` of this data-parallel rank's micro-batches (each rank reads only its own);
    with ``vocab_size`` every micro-batch's ids are checked against it."""
    from pmodel.data import MicroBatchLoader
    mesh = launch.mesh

    def data(start):
        # data ranks: dp x ep (expert-parallel ranks see different tokens), numbered ep fastest
        ep = mesh.size("ep")
        it = MicroBatchLoader(dataset, micro_batch_size=args.micro_batch_size, num_micro_batches=lay["microbatches"],
                              start=start, dp_rank=mesh.rank("ep") + ep * mesh.rank("dp"), dp_size=ep * mesh.size("dp"),
                              collator=collator,
                              num_samples=num_samples)
        return ([to_batch(check_token_ids(mb, vocab_size, launch.prog)) for mb in micros] for micros in it)
    return data


def gather(plan, params, template, workdir):
    """The full (single-process layout) params on the lead rank, ``None`` elsewhere (collective).

    Every rank writes its pieces through the reshardable checkpoint format into ``workdir``; the
    lead fills ``template`` (full-shaped params, e.g. the tree the run was sharded from) from them.
    """
    if plan.mesh.world_size == 1:
        return params
    import shutil

    from pmodel.checkpoint import sharded
    d = plan.save_checkpoint(workdir, 0, params, None)
    out = None
    if plan.is_lead:
        out = sharded.load(None, params=template, path=d)[0]
    import torch.distributed as dist
    dist.barrier()
    if plan.is_lead:
        shutil.rmtree(workdir, ignore_errors=True)
    return out
