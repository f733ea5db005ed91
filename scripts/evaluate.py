#!/usr/bin/env python
"""Evaluate a model on MMLU, C-Eval, BoolQ, GSM8K, HumanEval, BBH or AGIEval (ModelLink's flags).

One process or many (``python -m torch.distributed.run --nproc-per-node N scripts/evaluate.py
...``): with ``--tensor-model-parallel-size T`` (default 1) each group of T ranks holds one model
split by tensor parallelism (each rank caches its own KV heads), and the N / T groups (data
parallel) evaluate every (N / T)-th batch of questions; the lead gathers the records, so the
results equal one process. Examples::

    python scripts/evaluate.py --task mmlu --task-data-path mmlu/data/test --load-hf llama2-7b-hf \\
        --max-new-tokens 1 --evaluation-batch-size 4 --results-file mmlu.json
    python scripts/evaluate.py --task mmlu --task-data-path mmlu/data/test --load-hf hf_dir \\
        --scoring loglikelihood                 # lm-eval's acc / acc_norm instead of a generated letter
    python scripts/evaluate.py --task human_eval --task-data-path HumanEval.jsonl.gz --load-hf hf_dir \\
        --num-samples-per-task 10 --temperature 0.8 --pass-k 1 10
    python scripts/evaluate.py --task human_eval --task-data-path HumanEval.jsonl.gz \\
        --samples completions.jsonl             # score completions made elsewhere (no model)
    python -m torch.distributed.run --nproc-per-node 4 scripts/evaluate.py --task mmlu \\
        --task-data-path mmlu/data/test --load-hf hf_dir --tensor-model-parallel-size 2   # TP2 x DP2

``--load DIR`` reads pmodel's native (sharded, reshardable) checkpoint, the counterpart of
ModelLink's Megatron ``--load``; the architecture flags of ModelLink's scripts are checked against
the checkpoint's configuration and refused where they disagree. Every flag takes effect or is
refused with the reason. HumanEval completions run only in the sandbox of
:mod:`pmodel.evaluation.sandbox` (``docs/evaluation.md`` lists its limits).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common as cli  # noqa: E402

import pmodel  # noqa: E402
from pmodel import evaluation as ev  # noqa: E402

PROG = "evaluate.py"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("task (ModelLink evaluation.py names)")
    g.add_argument("--task", required=True, help="mmlu, ceval, boolq, gsm8k, bbh, agieval, human_eval")
    g.add_argument("--task-data-path", required=True, help="the task's data folder or file, as distributed")
    g.add_argument("--max-new-tokens", type=int, help="generation length (default: the task's)")
    g.add_argument("--evaluation-batch-size", type=int, help="questions per forward (default --micro-batch-size, else 1)")
    g.add_argument("--max-eval-samples", type=int, help="first N questions of each subject")
    g.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the benchmark's own count)")
    g.add_argument("--prompt-type", help="chat template for the prompt (one user turn); default: plain text")
    g.add_argument("--scoring", choices=("generate", "loglikelihood"),
                   help="multiple-choice tasks: generate an answer (ModelLink, default) or compare choice "
                        "log-likelihoods (lm-eval acc / acc_norm)")
    g.add_argument("--results-file", help="results JSON (default: <task>_results.json in the working directory)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = ap.add_argument_group("HumanEval")
    g.add_argument("--samples", help="JSONL of {task_id, completion}: score these instead of generating")
    g.add_argument("--num-samples-per-task", type=int, default=1, help="completions per problem (n of pass@k)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature for HumanEval samples")
    g.add_argument("--top-p", type=float)
    g.add_argument("--pass-k", type=int, nargs="+", default=[1], help="the k of pass@k")
    g.add_argument("--sandbox-timeout", type=float, default=10.0, help="seconds per program (wall clock)")
    g.add_argument("--sandbox-memory-mb", type=int, default=2048, help="address space per process")
    g.add_argument("--allow-unsandboxed", action="store_true",
                   help="where the kernel refuses namespaces, run generated code with limits and a timeout "
                        "but WITHOUT network or filesystem isolation")
    g = ap.add_argument_group("model")
    g.add_argument("--load-hf", help="HF checkpoint folder (any supported family)")
    g.add_argument("--load", help="pmodel native checkpoint root or iter_* folder (ModelLink's --load)")
    g.add_argument("--lora-load", help="PEFT LoRA adapter folder applied on top (not merged)")
    g.add_argument("--seq-length", type=int, help="the evaluation window (prompts are cut from the left)")
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"))
    g.add_argument("--position-embedding-type", choices=("rope", "alibi", "learned_absolute", "none"))
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="always the case here: a missing checkpoint is an error")
    g.add_argument("--no-load-rng", action="store_true", help="always the case here: evaluation restores no RNG")
    g.add_argument("--no-load-optim", action="store_true", help="always the case here: only parameters are read")
    g.add_argument("--no-masked-softmax-fusion", action="store_true",
                   help="always the case here: attention never uses a fused masked softmax")
    g.add_argument("--tokenizer-not-use-fast", action="store_true",
                   help="use the SentencePiece tokenizer.model of the tokenizer folder (HF's slow tokenizer)")
    g.add_argument("--seed", type=int, default=1234, help="sampling seed")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, help="set by torch.distributed.launch")
    cli.add_tokenizer_flags(ap)
    g = ap.add_argument_group("parallelism (launch with torch.distributed.run: TP ranks share a model, data-parallel "
                              "groups split the batches)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="ranks holding one model (tensor parallel); the world size must be a multiple")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="only 1 (refused otherwise)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or npu (under torchrun: the LOCAL_RANK-th device)")
    cli.add_kernel_flags(ap)
    return ap


def validate(args) -> None:
    def no(msg):
        cli.refuse(PROG, msg)
    try:
        task = ev.get_task(args.task)
    except ValueError as e:
        no(f"--task: {e}")
    if args.bf16 and args.fp16:
        no("--bf16 and --fp16 are exclusive")
    if args.samples:
        if task.kind != "code":
            no(f"--samples scores HumanEval completions; --task {args.task} is not a code task")
        model_flags = [f for f in ("load_hf", "load", "lora_load", "tokenizer_name_or_path", "tokenizer_model")
                       if getattr(args, f)]
        if model_flags:
            no(f"--samples scores given completions without a model; drop --{model_flags[0].replace('_', '-')}")
    elif not (args.load_hf or args.load):
        no("no model: give --load-hf (HF folder) or --load (native checkpoint), or --samples for HumanEval")
    if args.load_hf and args.load:
        no("--load-hf and --load both name the weights; give one")
    if args.pipeline_model_parallel_size != 1:
        no(f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: pipeline-parallel evaluation is not "
           "supported (a decode step is one token: every stage would wait on the previous one, so PP only adds "
           "latency); split a model that does not fit one device with --tensor-model-parallel-size, and add "
           "data-parallel ranks for throughput")
    tp, world = args.tensor_model_parallel_size, cli.world_size()
    if tp < 1:
        no(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if tp > 1 and args.samples:
        no("--samples scores given completions without a model; --tensor-model-parallel-size does not apply")
    if tp > 1 and world == 1:
        no(f"--tensor-model-parallel-size {tp} needs one process per rank: launch with torch.distributed.run, e.g. "
           f"python -m torch.distributed.run --nproc-per-node {tp} scripts/{PROG} ...")
    if world % tp:
        no(f"world size {world} is not a multiple of --tensor-model-parallel-size {tp} (each data-parallel group "
           f"holds one model on {tp} ranks)")
    for f in ("max_new_tokens", "evaluation_batch_size", "max_eval_samples", "micro_batch_size", "seq_length",
              "num_samples_per_task"):
        v = getattr(args, f)
        if v is not None and v < 1:
            no(f"--{f.replace('_', '-')} must be >= 1, got {v}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        no(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if task.kind != "choice" and args.scoring == "loglikelihood":
        no(f"--scoring loglikelihood compares choices; {args.task} has none (it is scored by generation)")
    if args.scoring == "loglikelihood" and args.max_new_tokens is not None:
        no("--max-new-tokens sets a generation length; --scoring loglikelihood generates nothing")
    if task.kind != "code":
        for f, default in (("num_samples_per_task", 1), ("temperature", 0.0), ("top_p", None), ("pass_k", [1]),
                           ("sandbox_timeout", 10.0), ("sandbox_memory_mb", 2048), ("allow_unsandboxed", False)):
            if getattr(args, f) != default:
                no(f"--{f.replace('_', '-')} applies to HumanEval (--task human_eval)")
    else:
        if args.num_samples_per_task > 1 and args.temperature <= 0 and not args.samples:
            no(f"--num-samples-per-task {args.num_samples_per_task} with greedy decoding gives identical samples; "
               "set --temperature > 0")
        if args.samples and (args.num_samples_per_task != 1 or args.temperature != 0.0 or args.top_p is not None):
            no("--samples brings its own completions; --num-samples-per-task / --temperature / --top-p do not apply")
        for k in args.pass_k:
            if k < 1 or (not args.samples and k > args.num_samples_per_task):
                no(f"--pass-k {k} needs 1 <= k <= --num-samples-per-task ({args.num_samples_per_task})")
        if args.top_p is not None and args.temperature <= 0:
            no("--top-p needs --temperature > 0 (greedy decoding ignores it)")
    if args.group_query_attention != (args.num_query_groups is not None):
        no("--group-query-attention and --num-query-groups go together")
    if args.load_hf:
        given = [f for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                             "normalization", "position_embedding_type", "make_vocab_size_divisible_by")
                 if getattr(args, f) is not None]
        given += [f for f in ("swiglu", "disable_bias_linear", "untie_embeddings_and_output_weights") if getattr(args, f)]
        if given:
            no(f"--load-hf takes the architecture from the checkpoint; drop --{given[0].replace('_', '-')} "
               "(--load checks these flags against a native checkpoint)")
    if args.tokenizer_model and args.tokenizer_name_or_path:
        no("give one of --tokenizer-model and --tokenizer-name-or-path")
    if args.use_mc2:
        no("--use-mc2 fuses sequence-parallel communication into matmuls; evaluation runs tensor parallel without "
           "sequence parallelism (a one-token decode step cannot be split over the sequence)")


def check_architecture(args, cfg) -> None:
    """ModelLink's architecture flags against a native checkpoint's configuration."""
    want = {"--num-layers": (args.num_layers, cfg.num_layers), "--hidden-size": (args.hidden_size, cfg.hidden_size),
            "--ffn-hidden-size": (args.ffn_hidden_size, cfg.ffn_hidden_size),
            "--num-attention-heads": (args.num_attention_heads, cfg.num_heads),
            "--num-query-groups": (args.num_query_groups, cfg.num_kv_heads),
            "--max-position-embeddings": (args.max_position_embeddings, cfg.max_position_embeddings),
            "--make-vocab-size-divisible-by": (args.make_vocab_size_divisible_by, cfg.pad_vocab_to),
            "--normalization": (args.normalization, {"rms": "RMSNorm", "layer": "LayerNorm"}[cfg.norm]),
            "--position-embedding-type": (args.position_embedding_type,
                                          {"rope": "rope", "alibi": "alibi", "learned": "learned_absolute",
                                           "none": "none"}[cfg.position])}
    bad = [f"{k} {a} (checkpoint: {b})" for k, (a, b) in want.items() if a is not None and a != b]
    if args.num_query_groups is None and args.num_attention_heads is not None and cfg.num_kv_heads != cfg.num_heads:
        bad.append(f"no --group-query-attention (checkpoint: {cfg.num_kv_heads} KV heads for {cfg.num_heads} heads)")
    if args.swiglu and cfg.activation != "swiglu":
        bad.append(f"--swiglu (checkpoint: {cfg.activation})")
    if args.disable_bias_linear and (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        bad.append("--disable-bias-linear (checkpoint has linear biases)")
    if args.untie_embeddings_and_output_weights and cfg.tie_embeddings:
        bad.append("--untie-embeddings-and-output-weights (checkpoint ties them)")
    if bad:
        cli.refuse(PROG, "the architecture flags disagree with the checkpoint at --load: " + "; ".join(bad))


def load_model(args, launch):
    """``(model, params, description)`` from --load-hf / --load (+ --lora-load)."""
    from pmodel.checkpoint import sharded
    from pmodel.model import ModelConfig, build
    kernels = cli.kernels_of(args, launch.device, PROG)
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    if args.load_hf:
        if not Path(args.load_hf).is_dir():
            cli.refuse(PROG, f"--load-hf {args.load_hf}: no such folder")
        model, params = pmodel.load_hf(args.load_hf, dtype=dtype or torch.float32)
        model = model.replace(kernels=kernels)
        what = {"load_hf": str(Path(args.load_hf).resolve())}
    else:
        d = Path(args.load)
        d = d if (d / "manifest.json").is_file() else sharded.latest(d)
        if d is None or not (Path(d) / "manifest.json").is_file():
            cli.refuse(PROG, f"--load {args.load}: no checkpoint there (--exit-on-missing-checkpoint is always on)")
        man = json.loads((Path(d) / "manifest.json").read_text())
        if not isinstance(man.get("config"), dict):
            cli.refuse(PROG, f"--load {d}: the manifest records no model config")
        cfg = ModelConfig.from_dict(man["config"])
        check_architecture(args, cfg)
        if dtype is not None:
            cfg = cfg.replace(dtype=dtype)
        model = build(cfg, kernels, family=man.get("family") or "llama")
        template = pmodel.init(model, seed=0)
        try:
            got = sharded.load(None, params=template, path=d, config=cfg.to_dict(), restore_rng_state=False,
                               cast_dtype=True)
        except sharded.CheckpointError as e:
            cli.refuse(PROG, str(e))
        params = got[0]
        what = {"load": str(Path(d).resolve()), "step": man.get("step")}
    if args.lora_load:
        from pmodel.checkpoint import peft as peft_io
        model, params = peft_io.load_adapter(model, params, args.lora_load)
        what["lora_load"] = str(Path(args.lora_load).resolve())
    params = pmodel.tree.map(lambda t: t.to(launch.device), params)
    for leaf in pmodel.tree.leaves(params):
        if isinstance(leaf, torch.Tensor):
            leaf.requires_grad_(False)
    return model, params, what


def load_tok(args):
    default = args.load_hf
    path = args.tokenizer_model or args.tokenizer_name_or_path or default
    if path is None:
        cli.refuse(PROG, "no tokenizer: give --tokenizer-name-or-path or --tokenizer-model (--load holds none)")
    if args.tokenizer_not_use_fast:
        p = Path(path)
        sp = p if p.is_file() and p.suffix == ".model" else p / "tokenizer.model"
        if not sp.is_file():
            cli.refuse(PROG, f"--tokenizer-not-use-fast: no SentencePiece tokenizer.model in {path}")
        if args.tokenizer_type not in (None, "PretrainedFromHF", "SentencePieceTokenizer", "Llama2Tokenizer",
                                       "GPTSentencePieceTokenizer"):
            cli.refuse(PROG, f"--tokenizer-not-use-fast picks SentencePiece; --tokenizer-type {args.tokenizer_type} "
                             "reads something else")
        return pmodel.data.load_tokenizer(sp, kind="sentencepiece")
    kind = cli.TOKENIZER_TYPES[args.tokenizer_type] if args.tokenizer_type else "auto"
    return pmodel.data.load_tokenizer(path, kind=kind)


def distribute(args, launch, model, params):
    """Under torchrun: the process groups, the tensor-parallel model and this rank's shards.

    Returns ``(model, params, dp_rank, dp_size, gather)``: ``gather`` all-gathers a rank's records
    over its data-parallel group (the TP ranks of a group compute the same records; rank 0's group
    is the one that reports), None with one data-parallel group."""
    tp = args.tensor_model_parallel_size
    if launch.world == 1:
        return model, params, 0, 1, None
    import torch.distributed as dist
    from pmodel.parallel import Mesh
    from pmodel.parallel.mesh import init_distributed
    if tp > 1:
        from pmodel.parallel.tensor import tp_size_problems
        problems = tp_size_problems(model.config, tp)
        if problems:
            cli.refuse(PROG, cli.flag_message("; ".join(problems)))
    if "MASTER_ADDR" not in os.environ:
        cli.refuse(PROG, "WORLD_SIZE > 1 without MASTER_ADDR: launch with torch.distributed.run")
    if launch.device.type == "cuda":
        torch.cuda.set_device(launch.device)
    # 30 minutes (torch's gloo default): data-parallel groups wait for each other only at the final
    # gather, up to one batch (a HumanEval batch runs its programs too) apart.
    init_distributed(rank=launch.rank, world_size=launch.world, device_type=launch.device.type, timeout_s=1800.0)
    mesh = launch.mesh = Mesh.build(tp=tp, pp=1)
    if tp > 1:
        from pmodel.parallel.tensor import shard_params, tensor_parallel
        try:
            model = tensor_parallel(model, mesh)
            params = shard_params(model, params)
        except (ValueError, NotImplementedError) as e:
            cli.refuse(PROG, cli.flag_message(str(e)))
    dp, group = mesh.size("dp"), mesh.group("dp")
    gather = None
    if dp > 1:
        def gather(local):
            out = [None] * dp
            dist.all_gather_object(out, local, group=group)
            return out
    return model, params, mesh.rank("dp"), dp, gather


def data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    validate(args)
    task = ev.get_task(args.task)
    launch = cli.Launch(args, PROG)
    scoring = args.scoring or "generate"
    bs = args.evaluation_batch_size or args.micro_batch_size or 1
    limits = ev.SandboxLimits(timeout_s=args.sandbox_timeout, cpu_s=max(1, int(args.sandbox_timeout)),
                              memory_bytes=args.sandbox_memory_mb << 20)
    try:
        questions = ev.load_questions(task, args.task_data_path, shots=args.num_fewshot, limit=args.max_eval_samples)
    except (ev.TaskDataError, FileNotFoundError, ValueError) as e:
        cli.refuse(PROG, str(e))
    if not questions:
        cli.refuse(PROG, f"--task-data-path {args.task_data_path}: no questions")
    if task.kind == "code" and not args.allow_unsandboxed:
        why = ev.sandbox_available()
        if why is not None:
            cli.refuse(PROG, f"the sandbox for generated code needs user, mount, network and PID namespaces, and "
                             f"this kernel refused them ({why}); pass --allow-unsandboxed to run with resource limits "
                             "and a timeout only (no network or filesystem isolation)")
    cfg_kw = dict(scoring=scoring, batch_size=bs, max_new_tokens=args.max_new_tokens, template=args.prompt_type,
                  num_samples=args.num_samples_per_task, temperature=args.temperature, top_p=args.top_p,
                  seed=args.seed, pass_k=tuple(args.pass_k), sandbox=limits, allow_unsandboxed=args.allow_unsandboxed,
                  progress=not args.no_progress and launch.lead)
    t0 = time.perf_counter()
    info: dict = {}
    tp, dp = args.tensor_model_parallel_size, 1
    if args.samples:
        if not launch.lead:
            return 0  # scoring given completions needs no model: the lead alone does it
        recs = []
        with open(args.samples, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        cli.refuse(PROG, f"{args.samples}:{n}: not valid JSON ({e.msg})")
        # pass@k's k is checked against the samples per problem in score_samples (num_samples is only
        # EvalConfig's bound for k here; no sampling happens).
        k = max(args.pass_k)
        cfg = ev.EvalConfig(**{**cfg_kw, "num_samples": k, "temperature": 1.0 if k > 1 else 0.0})
        try:
            records = ev.score_samples(questions, recs, cfg, source=args.samples)
        except ValueError as e:
            cli.refuse(PROG, str(e))
        result = {"records": records, "summary": ev.summarize(task, records, cfg)}
        info["samples"] = {"path": str(Path(args.samples).resolve()), "sha256": ev.file_sha256(args.samples)}
        world, rank = 1, 0
    else:
        try:
            tokenizer = load_tok(args)
        except (ValueError, FileNotFoundError) as e:
            cli.refuse(PROG, str(e))
        if args.prompt_type is not None:
            try:
                pmodel.data.get_template(args.prompt_type)
            except (KeyError, ValueError) as e:
                cli.refuse(PROG, f"--prompt-type: {e}")
        world, rank = launch.world, launch.rank
        try:
            model, params, info = load_model(args, launch)
            model, params, dp_rank, dp, gather = distribute(args, launch, model, params)
            seq = args.seq_length or model.config.max_position_embeddings
            if seq > model.config.max_position_embeddings:
                cli.refuse(PROG, f"--seq-length {seq} exceeds the model's {model.config.max_position_embeddings} positions")
            # The TP ranks of a group generate the same completions; only the first runs them.
            first_tp = launch.mesh is None or launch.mesh.rank("tp") == 0
            cfg = ev.EvalConfig(**cfg_kw, max_len=seq, run_code=first_tp)
            launch.say(f"evaluating {task.name} ({len(questions)} questions, {scoring if task.kind == 'choice' else task.kind}"
                       f", batch {bs}) on {world} rank(s)" + (f": tensor parallel {tp} x data parallel {dp}"
                                                               if tp > 1 else ""))
            try:
                result = ev.evaluate(model, params, tokenizer, task, questions, cfg, rank=dp_rank, world=dp,
                                     gather=gather)
            except ev.SandboxUnavailable as e:
                cli.refuse(PROG, f"sandbox unavailable: {e} (--allow-unsandboxed runs without isolation)")
            except ValueError as e:
                cli.refuse(PROG, str(e))
        finally:
            launch.close()
        info["tokenizer"] = getattr(tokenizer, "path", "")
    if rank != 0:
        return 0
    summary = result["summary"]
    files = data_files(Path(args.task_data_path))
    settings = {k: v for k, v in vars(args).items() if k not in ("local_rank",)}
    out = {"task": task.name, "model": info, "data_files": [{"path": str(p.resolve()), "sha256": ev.file_sha256(p)}
                                                           for p in files],
           "settings": {**settings, "scoring": scoring if task.kind == "choice" else task.kind, "evaluation_batch_size": bs,
                        "world_size": world, "data_parallel_size": dp,
                        "shots": task.shots if args.num_fewshot is None else args.num_fewshot},
           "environment": {"pmodel": pmodel.__version__, "torch": torch.__version__, "python": platform.python_version()},
           "summary": summary, "records": result["records"], "seconds": round(time.perf_counter() - t0, 3)}
    path = Path(args.results_file or f"{task.name}_results.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    width = max([len(s) for s in summary["subjects"]] + [7])
    keys = [k for k in next(iter(summary["subjects"].values())) if k != "n"]
    print(f"{'subject':<{width}}  {'n':>5}  " + "  ".join(f"{k:>10}" for k in keys))
    for s, v in summary["subjects"].items():
        print(f"{s:<{width}}  {v['n']:>5}  " + "  ".join(f"{v[k]:>10.4f}" for k in keys))
    ov = summary["overall"]
    for kind in ("micro", "macro"):
        print(f"{'total ' + kind:<{width}}  {ov['n']:>5}  " + "  ".join(f"{ov[k + '_' + kind]:>10.4f}" for k in keys))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
