"""What generate.py, chat.py and serve.py share: model / adapter / tokenizer loading from
ModelLink-style flags, the Megatron architecture flags checked against the checkpoint, the
sampling flags, and tensor-parallel setup under torch.distributed.run.

Every flag takes effect or is refused naming the reason; Megatron flags that only switch off
fusions pmodel does not have, or name what inference never loads (optimizer, RNG), are accepted
and listed in ``--help`` as such.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common as cli  # noqa: E402
import torch  # noqa: E402

import pmodel  # noqa: E402
from pmodel import tree  # noqa: E402
from pmodel.inference import GenerationConfig  # noqa: E402
from pmodel.params import is_decl  # noqa: E402

# Megatron flags accepted because what they ask is already the case in pmodel inference.
ALREADY = {
    "--attention-softmax-in-fp32": "attention takes its softmax in fp32 accumulation",
    "--no-load-optim": "inference never loads optimizer state",
    "--no-load-rng": "inference never loads RNG state (sampling uses --seed)",
    "--no-masked-softmax-fusion": "pmodel has no masked-softmax fusion",
    "--no-gradient-accumulation-fusion": "inference computes no gradients",
    "--exit-on-missing-checkpoint": "a missing checkpoint always exits with an error",
    "--tokenizer-not-use-fast": "pmodel's tokenizers are the reference (slow) implementations",
}


def add_model_flags(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("model (the architecture flags are checked against the checkpoint)")
    g.add_argument("--load-hf", help="an HF checkpoint folder (config.json + safetensors)")
    g.add_argument("--load", help="ModelLink's checkpoint flag: an HF folder or a pmodel checkpoint "
                   "(pretrain.py --save)")
    for f in ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups",
              "--max-position-embeddings", "--vocab-size"):
        g.add_argument(f, type=int)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--seq-length", type=int, help="context length for generation (prompt + new tokens at most)")
    g.add_argument("--position-embedding-type", choices=("rope", "alibi", "learned_absolute"))
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"))
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None)
    g.add_argument("--micro-batch-size", type=int, default=None, help="prompts per generation batch (batch mode)")
    g.add_argument("--global-batch-size", type=int, default=None, help="accepted for ModelLink scripts; generation "
                   "has no global batch (a notice says so)")
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, help="set by torch.distributed.launch")
    for f, why in ALREADY.items():
        g.add_argument(f, action="store_true", help=f"accepted: {why}")
    g = ap.add_argument_group("LoRA at inference (ModelLink flag names)")
    g.add_argument("--lora-load", help="a PEFT adapter folder applied on top of the base checkpoint")
    g.add_argument("--lora-r", type=int, help="checked against the adapter's rank")
    g.add_argument("--lora-alpha", type=float, help="checked against the adapter's alpha")
    g.add_argument("--lora-target-modules", nargs="+", help="checked against the adapter's modules")
    g.add_argument("--lora-merge", action="store_true", help="fold the adapter into the weights before generating "
                   "(same tokens; the fast decode step then applies)")
    cli.add_tokenizer_flags(ap)
    g = ap.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g = ap.add_argument_group("parallelism (TP under torch.distributed.run: one process per rank)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--device", default="cpu")
    cli.add_kernel_flags(ap)


def add_sampling_flags(ap: argparse.ArgumentParser, *, max_new_default: int = 128) -> None:
    g = ap.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_default)
    g.add_argument("--max-length", type=int, help="prompt + new tokens at most (default --seq-length or the model's)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default without sampling flags)")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", nargs="+", default=[], help="stop strings")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--early-stopping", choices=("true", "false", "never"), default="false")


def config_of(args, prog: str, *, stop_ids=(), sample_default: float = 0.0) -> GenerationConfig:
    t = args.temperature
    if t is None:
        t = sample_default
        if args.top_k is not None or args.top_p is not None or args.min_p is not None:
            cli.refuse(prog, "--top-k / --top-p / --min-p shape sampling: give --temperature > 0 "
                             "(the default is greedy)")
    es = {"true": True, "false": False, "never": "never"}[args.early_stopping]
    try:
        return GenerationConfig(max_new_tokens=args.max_new_tokens, max_length=args.max_length or args.seq_length,
                                temperature=t, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                                frequency_penalty=args.frequency_penalty, seed=args.seed, stop_ids=tuple(stop_ids),
                                stop_strings=tuple(args.stop), num_beams=args.num_beams,
                                length_penalty=args.length_penalty, early_stopping=es)
    except (ValueError, NotImplementedError) as e:
        msg = str(e)
        for name in ("max_new_tokens", "num_beams", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "max_length"):
            msg = msg.replace(name, "--" + name.replace("_", "-"))
        cli.refuse(prog, msg)


# ----------------------------------------------------------------------------- checks
def _arch_checks(args, cfg) -> list[tuple[str, object, object]]:
    """(flag, given, checkpoint) for every architecture flag given."""
    out = []
    pairs = {"--num-layers": cfg.num_layers, "--hidden-size": cfg.hidden_size, "--ffn-hidden-size": cfg.ffn_hidden_size,
             "--num-attention-heads": cfg.num_heads, "--max-position-embeddings": cfg.max_position_embeddings,
             "--vocab-size": cfg.vocab_size}
    for flag, have in pairs.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is not None:
            out.append((flag, v, have))
    if args.group_query_attention or args.num_query_groups is not None:
        out.append(("--num-query-groups", args.num_query_groups or cfg.num_heads, cfg.num_kv_heads))
    elif args.num_attention_heads is not None:
        out.append(("--num-query-groups (none given: multi-head)", cfg.num_heads, cfg.num_kv_heads))
    if args.position_embedding_type:
        out.append(("--position-embedding-type", {"learned_absolute": "learned"}.get(args.position_embedding_type,
                                                                                       args.position_embedding_type),
                    cfg.position))
    if args.normalization:
        out.append(("--normalization", {"RMSNorm": "rms", "LayerNorm": "layer"}[args.normalization], cfg.norm))
    if args.swiglu:
        out.append(("--swiglu", "swiglu", cfg.activation))
    if args.untie_embeddings_and_output_weights:
        out.append(("--untie-embeddings-and-output-weights", False, cfg.tie_embeddings))
    if args.disable_bias_linear:
        out.append(("--disable-bias-linear", False, cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias))
    return out


def validate(args, prog: str) -> None:
    no = lambda m: cli.refuse(prog, m)  # noqa: E731
    if bool(args.load) == bool(args.load_hf):
        no("give the checkpoint with one of --load-hf and --load")
    if args.bf16 and args.fp16:
        no("--bf16 and --fp16 are exclusive")
    if args.pipeline_model_parallel_size != 1:
        no("--pipeline-model-parallel-size > 1: pipeline-parallel inference is not supported (a decode step is one "
           "token: every stage would wait on the previous one, so PP only adds latency; use "
           "--tensor-model-parallel-size to split a model that does not fit one device)")
    if args.sequence_parallel:
        no("--sequence-parallel cannot split a one-token decode step over the sequence; drop it for inference")
    if args.tensor_model_parallel_size < 1:
        no(f"--tensor-model-parallel-size must be >= 1, got {args.tensor_model_parallel_size}")
    world = cli.world_size()
    if args.tensor_model_parallel_size > 1 and world == 1:
        no("--tensor-model-parallel-size > 1 needs one process per rank: launch with torchrun, e.g. "
           f"python -m torch.distributed.run --nproc-per-node {args.tensor_model_parallel_size} scripts/{prog} ...")
    if world != args.tensor_model_parallel_size:
        no(f"world size {world} != --tensor-model-parallel-size {args.tensor_model_parallel_size}: generation runs one "
           "model replica (no data-parallel inference); launch exactly TP processes")
    if args.lora_load is None and any(v is not None for v in (args.lora_r, args.lora_alpha, args.lora_target_modules)):
        no("--lora-r / --lora-alpha / --lora-target-modules describe the adapter given with --lora-load")
    if args.lora_merge and not args.lora_load:
        no("--lora-merge needs --lora-load")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        no(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    if args.tokenizer_model and args.tokenizer_name_or_path:
        # ModelLink scripts pass both (a folder and the .model inside it): allowed when consistent
        if Path(args.tokenizer_model).resolve().parent != Path(args.tokenizer_name_or_path).resolve():
            no("--tokenizer-model is not inside --tokenizer-name-or-path: give one of them")


def _check_adapter(args, model, prog):
    from pmodel.checkpoint import peft as peft_io
    from pmodel import lora as L
    cfg, mods = peft_io.read_adapter(args.lora_load)
    if args.lora_r is not None and int(cfg["r"]) != args.lora_r:
        cli.refuse(prog, f"--lora-r {args.lora_r} but the adapter in {args.lora_load} has r={cfg['r']}")
    if args.lora_alpha is not None and float(cfg["lora_alpha"]) != args.lora_alpha:
        cli.refuse(prog, f"--lora-alpha {args.lora_alpha} but the adapter has lora_alpha={cfg['lora_alpha']}")
    if args.lora_target_modules:
        want = {p.rsplit(".", 1)[-1] for p in L.resolve_targets(model.defs, args.lora_target_modules)}
        have = {m.rsplit(".", 1)[-1] for m in mods}
        if want != have:
            cli.refuse(prog, f"--lora-target-modules {' '.join(args.lora_target_modules)} name {sorted(want)}; the "
                             f"adapter adapts {sorted(have)}")


# ----------------------------------------------------------------------------- loading
class Loaded:
    """The model ready to generate: ``model``, ``params`` (this rank's), ``tokenizer``,
    ``launch`` (rank / lead), ``fast`` (the decode-step choice)."""

    def __init__(self, model, params, tokenizer, launch, fast):
        self.model, self.params, self.tokenizer, self.launch, self.fast = model, params, tokenizer, launch, fast


def _load_pmodel_checkpoint(path, dtype):
    from pmodel.checkpoint import sharded
    from pmodel.model import ModelConfig, build
    ck = sharded.read_full(path, state=False)
    cfg = ModelConfig.from_dict(ck.manifest["config"])
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    model = build(cfg)
    params = tree.map_with_path(lambda p, d: ck.params[p].to(cfg.dtype), model.defs, is_leaf=is_decl)
    return model, params


def load(args, prog: str) -> Loaded:
    """Load model, adapter and tokenizer from the flags; set up TP when launched under torchrun."""
    validate(args, prog)
    launch = cli.Launch(args, prog)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    src = args.load_hf or args.load
    if not Path(src).exists():
        cli.refuse(prog, f"checkpoint {src} does not exist")
    try:
        if (Path(src) / "config.json").is_file():
            model, params = pmodel.load_hf(src, dtype=dtype, device=launch.device)
        else:
            model, params = _load_pmodel_checkpoint(src, dtype)
            params = tree.map(lambda t: t.to(launch.device), params)
    except (ValueError, KeyError, FileNotFoundError) as e:
        cli.refuse(prog, f"{src}: {e}")
    for p in tree.leaves(params):
        p.requires_grad_(False)
    cfg = model.config
    if args.make_vocab_size_divisible_by not in (None, 1) and cfg.padded_vocab_size % args.make_vocab_size_divisible_by:
        cli.refuse(prog, f"--make-vocab-size-divisible-by {args.make_vocab_size_divisible_by}: the checkpoint's vocab "
                         f"{cfg.padded_vocab_size} is not padded to it")
    bad = [f"{f} {g} (checkpoint: {h})" for f, g, h in _arch_checks(args, cfg) if g != h]
    if bad:
        cli.refuse(prog, "architecture flags disagree with the checkpoint: " + "; ".join(bad))
    if args.global_batch_size is not None:
        launch.say(f"{prog}: note: --global-batch-size {args.global_batch_size} has no effect on generation (no "
                   "global batch; --micro-batch-size sets the prompts per batch)")
    kernel_flags = [f for f in ("use_flash_attn", "use_fused_rmsnorm", "use_fused_swiglu", "use_fused_rotary_pos_emb",
                                "use_mc2") if getattr(args, f)]
    if kernel_flags:
        model = model.replace(kernels=cli.kernels_of(args, launch.device, prog))
    # The fast decode step uses plain torch ops; a fused-kernel flag runs the model's own forward
    # with that kernel policy instead, so the flag takes effect.
    fast = "auto" if not kernel_flags else False
    if args.lora_load:
        from pmodel import lora as L
        from pmodel.checkpoint import peft as peft_io
        _check_adapter(args, model, prog)
        try:
            model, params = peft_io.load_adapter(model, params, args.lora_load)
        except (ValueError, KeyError, FileNotFoundError) as e:
            cli.refuse(prog, f"--lora-load {args.lora_load}: {e}")
        if args.lora_merge:
            model, params = L.base_model(model), L.merge(params)
    tp = args.tensor_model_parallel_size
    if tp > 1:
        from pmodel.parallel.tensor import shard_params, tensor_parallel, tp_size_problems
        problems = tp_size_problems(cfg, tp)
        if problems:
            cli.refuse(prog, cli.flag_message("; ".join(problems)))
        mesh = launch.build_mesh({"tp": tp, "pp": 1})
        model = tensor_parallel(model, mesh)
        params = shard_params(model, params)
    tok = cli.load_tokenizer(args, default=src if (Path(src) / "config.json").is_file() else None,
                             vocab_size=cfg.vocab_size)
    if tok is None:
        cli.refuse(prog, "no tokenizer: give --tokenizer-name-or-path / --tokenizer-model "
                         "(or an HF folder holding one)")
    return Loaded(model, params, tok, launch, fast)
