#!/usr/bin/env python
"""Convert checkpoints: Hugging Face <-> pmodel's sharded training format, at any TP / PP layout.

ModelLink's ``tools/checkpoint/convert_ckpt.py`` flag names. ``--loader`` / ``--saver`` name the
formats:

* ``megatron`` (also ``pmodel``, ``native``): pmodel's sharded, reshardable training checkpoint
  (what ``pretrain.py --save`` writes and ``--load`` reads; ``docs/training.md``). Megatron's own
  per-rank ("legacy") checkpoints are read by ``--loader mcore`` and not written: in ModelLink's
  scripts ``megatron`` names the training format, and here the training format is this one. ``--load-dir`` is a
  checkpoint root (its ``latest``) or one ``iter_*`` folder; ``--save-dir`` a root.
* ``hf``, ``huggingface`` or ``<model>_hf`` (ModelLink's ``llama2_hf``, ...): a Hugging Face
  folder (``config.json`` + safetensors) of any family pmodel supports; the family comes from
  its ``config.json`` (``model_type``).

* ``mcore`` (``--loader`` only): a megatron-core ``GPTModel`` checkpoint in Megatron's per-rank
  format (``--ckpt-format torch``: ``[iter_*/]mp_rank_XX[_YYY]/model_optim_rng.pt``, any TP / PP,
  the local layer spec; what ModelLink users bring), read with ``torch.load(weights_only=True)``
  only; a file that needs anything else unpickled is refused, naming it and the globals
  (``pmodel.checkpoint.mcore``). Parameters only; the config comes from the checkpoint's
  ``args``; the family is ``--model-type-hf`` or the first of llama / gpt2 that expresses it.

``--save-model-type save_huggingface_<model>`` (or ``huggingface``) writes a Hugging Face
folder whatever ``--saver`` says, as ModelLink's ``legacy2hf`` script does; when ``--save-dir``
already holds an HF model (``config.json``), the output goes to ``<save-dir>/mg2hg/`` as in
ModelLink and the tokenizer files are copied from it.

Examples::

    # HF -> training checkpoint for TP2 x PP2 (each rank's file holds that rank's shards)
    python scripts/convert_ckpt.py --model-type GPT --loader llama2_hf --saver megatron \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 \\
        --load-dir hf_dir --save-dir ckpt --tokenizer-model hf_dir/tokenizer.model
    # training checkpoint (any layout) -> HF
    python scripts/convert_ckpt.py --model-type GPT --loader megatron --saver megatron \\
        --save-model-type save_huggingface_llama --load-dir ckpt --save-dir out_hf
    # re-layout a training checkpoint (optimizer state and data position kept): -> TP1 x PP4
    python scripts/convert_ckpt.py --model-type GPT --loader megatron --saver megatron \\
        --target-pipeline-parallel-size 4 --load-dir ckpt --save-dir ckpt_pp4
    # merge a PEFT LoRA adapter (finetune.py --lora-r ... --save adapter) while converting
    python scripts/convert_ckpt.py --model-type GPT --loader hf --saver hf --load-dir base \\
        --lora-load adapter --save-dir merged

What happens to each part: parameters are cut exactly (bitwise) for the target layout.
Training state (Adam moments, fp32 main weights, step, consumed samples) survives
``megatron -> megatron`` conversion unless a LoRA merge changes the weights; HF output and HF
input carry parameters only (train on with ``pretrain.py --load DIR --no-load-optim``).
A LoRA adapter is merged as ``W + scale B A`` in fp32 and only then cast to the output dtype.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pmodel  # noqa: E402
from pmodel import tree  # noqa: E402
from pmodel.checkpoint import sharded  # noqa: E402
from pmodel.checkpoint.state import CheckpointError  # noqa: E402
from pmodel.model import ModelConfig, build  # noqa: E402
from pmodel.params import is_decl  # noqa: E402
from pmodel.parallel.plan import PipelineSpec, offline_mesh, rank_specs  # noqa: E402

PROG = "convert_ckpt.py"
NATIVE = ("megatron", "pmodel", "native")
HF = ("hf", "huggingface")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ModelLink --model-type-hf / save_huggingface_<x> names -> pmodel family names.
ALIASES = {"llama2": "llama", "llama3": "llama", "llama": "llama", "codellama": "llama", "yi": "llama",
           "mistral": "mistral", "qwen15": "qwen2", "qwen1.5": "qwen2", "qwen2": "qwen2"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt", "qwen.tiktoken")


def refuse(msg: str):
    raise SystemExit(f"{PROG}: {msg}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-type", required=True, help="GPT (decoder LLMs; BERT is not supported)")
    ap.add_argument("--loader", default="megatron",
                    help="source format: megatron (= pmodel's sharded training checkpoint, not Megatron's own "
                         "format), hf / huggingface / <model>_hf (a Hugging Face folder), mcore (a megatron-core "
                         "GPTModel checkpoint in Megatron's per-rank mp_rank_XX/model_optim_rng.pt format; read "
                         "with torch.load(weights_only=True) only)")
    ap.add_argument("--saver", default="megatron",
                    help="target format: megatron (= pmodel's sharded training checkpoint, not Megatron's own "
                         "format) or hf / huggingface")
    ap.add_argument("--save-model-type",
                    help="megatron, huggingface or ModelLink's save_huggingface_<model>: the latter two write a "
                         "Hugging Face folder")
    ap.add_argument("--load-dir", required=True, help="source folder")
    ap.add_argument("--save-dir", required=True, help="target folder (an HF model folder here: output to mg2hg/)")
    ap.add_argument("--target-tensor-parallel-size", type=int, default=1)
    ap.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    ap.add_argument("--num-layer-list", help="comma-separated layers per pipeline stage (uneven split)")
    ap.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                    help="layers per model chunk: which layers each pipeline rank's file holds (interleaved)")
    ap.add_argument("--params-dtype", choices=sorted(DTYPES), help="output parameter dtype (default: the source's)")
    ap.add_argument("--model-type-hf", help="model family (llama2, mistral, qwen2, ...): checked against an HF "
                                            "source; names it for a training checkpoint that does not record it")
    ap.add_argument("--tokenizer-model", help="tokenizer file: checked against the vocabulary; copied into an HF "
                                              "output folder")
    ap.add_argument("--lora-load", help="a PEFT LoRA adapter folder to merge into the weights (fp32 merge)")
    ap.add_argument("--lora-r", type=int, help="checked against the adapter's rank")
    ap.add_argument("--lora-alpha", type=float, help="checked against the adapter's alpha")
    ap.add_argument("--lora-target-modules", nargs="+", help="checked against the adapter's modules")
    return ap


def _kind(name: str, role: str) -> str:
    n = name.lower()
    if n in NATIVE:
        return "native"
    if n in HF or n.endswith("_hf"):
        return "hf"
    if n in ("mcore", "megatron_mcore", "mcore_gpt"):
        if role == "loader":
            return "mcore"
        refuse(f"--saver {name}: megatron-core checkpoints are read (--loader mcore), not written; "
               "use --saver megatron (pmodel's training format) or hf")
    refuse(f"--{role} {name}: unknown format; use megatron (pmodel's sharded training checkpoint), hf, "
           "or --loader mcore")


def _family_alias(name: str, flag: str) -> str:
    fam = ALIASES.get(name.lower(), name.lower())
    try:
        pmodel.families.get(fam)
    except KeyError as e:
        refuse(f"{flag} {name}: {e.args[0]}")
    return fam


def validate(args) -> dict:
    """Refuse flags that could not take effect; return the resolved plan."""
    if args.model_type != "GPT":
        refuse(f"--model-type {args.model_type}: only GPT (decoder-only LLMs) is supported")
    src, dst = _kind(args.loader, "loader"), _kind(args.saver, "saver")
    hf_name = None
    if args.save_model_type is not None:
        smt = args.save_model_type
        if smt == "megatron":
            if dst == "hf":
                refuse("--save-model-type megatron contradicts --saver hf")
        elif smt in HF or smt.startswith("save_huggingface_"):
            dst = "hf"
            if smt.startswith("save_huggingface_"):
                hf_name = _family_alias(smt[len("save_huggingface_"):], "--save-model-type")
        else:
            refuse(f"--save-model-type {smt}: expected megatron, huggingface or save_huggingface_<model>")
    tp, pp, v = args.target_tensor_parallel_size, args.target_pipeline_parallel_size, \
        args.num_layers_per_virtual_pipeline_stage
    if tp < 1 or pp < 1:
        refuse("--target-tensor-parallel-size and --target-pipeline-parallel-size must be >= 1")
    if dst == "hf" and (tp, pp) != (1, 1):
        refuse(f"--target-tensor-parallel-size {tp} / --target-pipeline-parallel-size {pp}: a Hugging Face "
               "checkpoint is not sharded; use 1 and 1 (or --saver megatron)")
    if dst == "hf" and (args.num_layer_list or v is not None):
        refuse("--num-layer-list / --num-layers-per-virtual-pipeline-stage lay out a training checkpoint; "
               "a Hugging Face output has no pipeline stages")
    if pp == 1 and (args.num_layer_list or v is not None):
        refuse("--num-layer-list / --num-layers-per-virtual-pipeline-stage need --target-pipeline-parallel-size > 1")
    if args.num_layer_list and v is not None:
        refuse("--num-layer-list and --num-layers-per-virtual-pipeline-stage: give one of them")
    lps = None
    if args.num_layer_list:
        try:
            lps = tuple(int(x) for x in args.num_layer_list.split(","))
        except ValueError:
            refuse(f"--num-layer-list {args.num_layer_list!r}: expected comma-separated integers, e.g. 1,3")
    lora_checks = {"--lora-r": args.lora_r, "--lora-alpha": args.lora_alpha,
                   "--lora-target-modules": args.lora_target_modules}
    given = [k for k, x in lora_checks.items() if x is not None]
    if given and not args.lora_load:
        refuse(f"{', '.join(given)} describe the adapter to merge: they need --lora-load")
    if src == dst == "native" and args.lora_load is None and args.params_dtype is None and (tp, pp) == (1, 1) \
            and lps is None and v is None and Path(args.load_dir).resolve() == Path(args.save_dir).resolve():
        refuse("--load-dir and --save-dir are the same and nothing would change")
    fam = _family_alias(args.model_type_hf, "--model-type-hf") if args.model_type_hf else None
    return {"src": src, "dst": dst, "tp": tp, "pp": pp, "layers_per_stage": lps, "chunk": v, "family": fam,
            "hf_name": hf_name}


# ----------------------------------------------------------------------------- loading
def _tree_of(model, flat: dict, what: str):
    """The model's params tree from ``{global path: tensor}``."""
    missing = [p for p, _ in tree.paths(model.defs, is_leaf=is_decl) if p not in flat]
    if missing:
        refuse(f"{what} lacks parameters the model declares, e.g. {missing[:3]}")
    names = {p for p, _ in tree.paths(model.defs, is_leaf=is_decl)}
    extra = sorted(set(flat) - names)
    if extra:
        refuse(f"{what} has parameters the model does not declare, e.g. {extra[:3]}")
    return tree.map_with_path(lambda p, d: flat[p], model.defs, is_leaf=is_decl)


def load_source(args, plan: dict):
    """``(model, params_tree, FullCheckpoint-or-None, info)`` from the source."""
    src = Path(args.load_dir)
    if plan["src"] == "hf":
        try:
            model, params = pmodel.load_hf(src, dtype=None, check_tokenizer=True)
        except (ValueError, KeyError, FileNotFoundError) as e:
            refuse(f"--load-dir {src}: {e}")
        if plan["family"] is not None and plan["family"] != model.family:
            refuse(f"--model-type-hf names family {plan['family']!r} but {src}/config.json is {model.family!r}")
        return model, params, None, {"step": 0, "data": {}, "tokenizer_dir": src}
    if plan["src"] == "mcore":
        return _load_mcore(args, plan, src)
    keep_state = plan["dst"] == "native" and args.lora_load is None
    try:
        ck = sharded.read_full(src, state=keep_state)
    except CheckpointError as e:
        refuse(f"--load-dir {src}: {e}")
    man = ck.manifest
    if not man.get("config"):
        refuse(f"--load-dir {src}: the manifest records no model config")
    cfg = ModelConfig.from_dict(man["config"])
    fam = (man.get("extra") or {}).get("family") or plan["family"]
    if fam is None and plan["dst"] == "hf":
        fam = plan["hf_name"]
    if fam is None:
        save_dir = Path(args.save_dir)
        if (save_dir / "config.json").is_file():
            fam = pmodel.families.config_from_hf(save_dir)[0].name
    if fam is None:
        refuse(f"--load-dir {src}: the checkpoint does not record its model family; give --model-type-hf")
    if plan["family"] is not None and plan["family"] != fam:
        refuse(f"--model-type-hf names family {plan['family']!r} but the checkpoint is {fam!r}")
    model = build(cfg, family=fam)
    params = _tree_of(model, ck.params, f"--load-dir {man['dir']}")
    return model, params, (ck if keep_state else None), {"step": int(man.get("step", 0)),
                                                          "data": man.get("data") or {}, "dir": man["dir"]}


def _mcore_family(cfg, wanted):
    """``wanted`` (--model-type-hf) if it can express ``cfg``, else the first of llama / gpt2 that
    can (its HF export accepts the config), else None (a family-less model)."""
    for fam in ([wanted] if wanted else ["llama", "gpt2"]):
        try:
            pmodel.families.get(fam).config_to_hf(cfg)
            return fam
        except (ValueError, KeyError):
            if wanted:
                refuse(f"--model-type-hf {wanted}: that family cannot express the megatron-core model's config")
    return None


def _load_mcore(args, plan, src: Path):
    from pmodel.checkpoint.mcore import McoreError, load_mcore
    try:
        cfg, flat, info = load_mcore(src)
    except McoreError as e:
        refuse(f"--load-dir {src}: {e}")
    fam = _mcore_family(cfg, plan["family"])
    if fam is None and plan["dst"] == "hf":
        refuse(f"--load-dir {src}: no Hugging Face family expresses this megatron-core config "
               f"(norm {cfg.norm}, activation {cfg.activation}, position {cfg.position}); use --saver megatron")
    model = build(cfg, family=fam)
    params = _tree_of(model, flat, f"--load-dir {info['dir']}")
    print(f"{PROG}: read megatron-core checkpoint {info['dir']} (tp {info['tp']} x pp {info['pp']}, "
          f"iteration {info['iteration']}) as a {fam or 'family-less'} model; parameters only", file=sys.stderr)
    return model, params, None, {"step": info["iteration"], "data": {}, "dir": info["dir"]}


def merge_lora(args, model, params):
    """The adapter of --lora-load merged in fp32: ``(base model, plain params)``."""
    from pmodel import lora as L
    from pmodel.checkpoint import peft
    try:
        lm, lp = peft.load_adapter(model, params, args.lora_load)
    except (ValueError, FileNotFoundError, KeyError) as e:
        refuse(f"--lora-load {args.lora_load}: {e}")
    spec = L.spec_of(lm)
    if args.lora_r is not None and args.lora_r != spec.rank:
        refuse(f"--lora-r {args.lora_r}: the adapter in {args.lora_load} has rank {spec.rank}")
    if args.lora_alpha is not None and args.lora_alpha != spec.alpha:
        refuse(f"--lora-alpha {args.lora_alpha:g}: the adapter in {args.lora_load} has alpha {spec.alpha:g}")
    if args.lora_target_modules is not None:
        t = args.lora_target_modules
        want = set(L.resolve_targets(model.defs, t[0] if len(t) == 1 else t))
        if want != set(spec.modules):
            refuse(f"--lora-target-modules {' '.join(t)} selects {len(want)} modules; the adapter in "
                   f"{args.lora_load} adapts {len(spec.modules)} ({sorted(spec.modules)[:3]} ...)")
    out_dtype = DTYPES[args.params_dtype] if args.params_dtype else None

    def merged(n):
        # W + scale * (B @ A) in fp32 (LoRA.merged's formula), cast once: to --params-dtype when
        # given (casting to W's dtype first would round twice), else to W's dtype.
        w = n.base.detach().float()
        delta = (n.b.detach().float() @ n.a.detach().float()) * n.scale  # (out, in)
        return (w + delta).to(out_dtype or n.base.dtype)
    plain = tree.map(lambda n: merged(n) if L.is_lora(n) else n, lp, is_leaf=L.is_lora)
    return L.base_model(lm), plain, len(spec.modules)


# ----------------------------------------------------------------------------- saving
def _copy_tokenizer(src: Path | None, dst: Path, tokenizer_model: str | None) -> list[str]:
    copied = []
    if src is not None and src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and (src.resolve() != dst.resolve()):
                shutil.copyfile(src / name, dst / name)
                copied.append(name)
    if tokenizer_model:
        t = Path(tokenizer_model)
        if t.is_file() and not (dst / t.name).exists():
            shutil.copyfile(t, dst / t.name)
            copied.append(t.name)
    return copied


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    plan = validate(args)
    model, params, ck, info = load_source(args, plan)
    if plan["hf_name"] is not None and plan["hf_name"] != model.family:
        refuse(f"--save-model-type {args.save_model_type}: the checkpoint is a {model.family} model")
    cfg = model.config
    if args.tokenizer_model:
        try:
            tok = pmodel.data.load_tokenizer(args.tokenizer_model)
            pmodel.data.check_vocab_size(tok, cfg.vocab_size)
        except (ValueError, FileNotFoundError) as e:
            refuse(f"--tokenizer-model {args.tokenizer_model}: {e}")
    merged = 0
    if args.lora_load:
        model, params, merged = merge_lora(args, model, params)
    if args.params_dtype:
        dt = DTYPES[args.params_dtype]
        params = tree.map(lambda t: t.to(dt) if t.is_floating_point() else t, params)
        model = build(cfg.replace(dtype=dt), family=model.family)
        cfg = model.config
    flat = {p: t.detach() for p, t in tree.paths(params)}
    out = Path(args.save_dir)
    report = {"loader": plan["src"], "saver": plan["dst"], "family": model.family, "step": info["step"],
              "lora_merged_modules": merged, "dtype": str(cfg.dtype).removeprefix("torch.")}
    if plan["dst"] == "hf":
        tok_src = info.get("tokenizer_dir")
        if (out / "config.json").is_file() and plan["src"] != "hf":
            tok_src, out = out, out / "mg2hg"  # ModelLink: --save-dir is the original HF model folder
        out.mkdir(parents=True, exist_ok=True)
        pmodel.save_hf(model, params, out)
        report["tokenizer_files"] = _copy_tokenizer(tok_src, out, args.tokenizer_model)
        report["saved"] = str(out)
    else:
        sizes = {"tp": plan["tp"], "pp": plan["pp"]}
        spec = None
        if plan["pp"] > 1:
            v = 1
            if plan["chunk"] is not None:
                if cfg.num_layers % (plan["pp"] * plan["chunk"]):
                    refuse(f"--num-layers-per-virtual-pipeline-stage {plan['chunk']}: {cfg.num_layers} layers do "
                           f"not split into {plan['pp']} stages of chunks of {plan['chunk']} layers")
                v = cfg.num_layers // (plan["pp"] * plan["chunk"])
            spec = PipelineSpec(schedule="interleaved" if v > 1 else "1f1b", layers_per_stage=plan["layers_per_stage"],
                                virtual_stages=v)
        try:
            specs = rank_specs(model, sizes, pipeline=spec)
        except (ValueError, NotImplementedError) as e:
            refuse(f"target layout --target-tensor-parallel-size {plan['tp']} --target-pipeline-parallel-size "
                   f"{plan['pp']}: {e}")
        full = ck if ck is not None else sharded.FullCheckpoint(params=flat)
        if ck is not None:
            full.params = flat  # possibly cast by --params-dtype
        extra = {"family": model.family, "converted_from": str(args.load_dir), "converter": PROG}
        if ck is not None:
            extra = {**(ck.manifest.get("extra") or {}), **extra}
        d = sharded.write_full(out, info["step"], full, specs, mesh_sizes=dict(offline_mesh(sizes, 0).sizes),
                               config=cfg.to_dict(), data=info["data"], extra=extra)
        report.update(saved=str(d), ranks=len(specs), tp=plan["tp"], pp=plan["pp"],
                      optimizer_state=bool(ck is not None and ck.state))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
