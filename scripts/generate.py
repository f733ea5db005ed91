#!/usr/bin/env python
"""Generate text: greedy, sampling, beam search; one prompt streamed, or a JSONL batch.

    python scripts/generate.py --load-hf models/stories260K --prompt "Once upon a time" --max-new-tokens 64
    python scripts/generate.py --load-hf base --lora-load adapter --inference-prompt-type alpaca \\
        --prompt "Give three tips for staying healthy." --temperature 0.7 --top-p 0.9 --seed 1
    python scripts/generate.py --load-hf base --input-file prompts.jsonl --output-file out.jsonl \\
        --micro-batch-size 8 --num-beams 4
    python -m torch.distributed.run --nproc-per-node 2 scripts/generate.py --load-hf base \\
        --tensor-model-parallel-size 2 --prompt "..."

Without ``--prompt`` / ``--input-file`` it runs ModelLink's ``inference.py`` demo: the prompt
"how are you?" through each ``--task`` (greedy, do_sample, beam_search), so ModelLink's
``generate_*.sh`` scripts run with only the entry point, paths and sizes changed (their
architecture flags are checked against the checkpoint, LoRA flags against the adapter).

``--input-file`` lines: ``{"prompt": "..."}``, ``{"instruction": "...", "input": "..."}``
(alpaca), ``{"messages": [{"role": ..., "content": ...}, ...]}``, or a JSON string. Output
lines: ``{"index", "prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens"}``
(one per returned sequence; ``"beam"`` with ``--num-return-sequences``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common as cli  # noqa: E402
import infer_common as ic  # noqa: E402

from pmodel.data.templates import Message, get_template, render  # noqa: E402
from pmodel.inference import complete, stream  # noqa: E402

PROG = "generate.py"
DEMO_PROMPT = "how are you?"  # ModelLink inference.py's demo prompt
TASKS = ("greedy", "do_sample", "beam_search")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ic.add_model_flags(ap)
    ic.add_sampling_flags(ap)
    g = ap.add_argument_group("input / output")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for a batch)")
    g.add_argument("--input-file", help="JSONL prompts (batch mode)")
    g.add_argument("--output-file", help="JSONL results (default: stdout)")
    g.add_argument("--inference-prompt-type", "--prompt-type", dest="prompt_type", default=None,
                   help="wrap each prompt as a user turn of this chat template (alpaca, llama2, chatml, ...)")
    g.add_argument("--system", default=None, help="system message for --inference-prompt-type")
    g.add_argument("--num-return-sequences", type=int, default=1, help="beams returned per prompt")
    g.add_argument("--no-stream", action="store_true", help="print a single prompt's text at the end, not as it comes")
    g.add_argument("--task", nargs="+", default=None, help=f"demo tasks without a prompt: {', '.join(TASKS)} "
                   "(ModelLink ids 1, 2, 3 too)")
    args = ap.parse_args(argv)
    if args.prompt and args.input_file:
        ap.error("give --prompt or --input-file, not both")
    if args.task and (args.prompt or args.input_file):
        ap.error("--task runs the demo prompt; with --prompt / --input-file the sampling flags choose the method")
    if args.output_file and not (args.prompt or args.input_file):
        ap.error("--output-file needs --prompt or --input-file")
    if args.system is not None and not args.prompt_type:
        ap.error("--system needs --inference-prompt-type (a chat template to put it in)")
    return args


def _read_inputs(path: str) -> list:
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            cli.refuse(PROG, f"{path}:{i + 1}: not JSON ({e})")
        if isinstance(rec, str):
            out.append(rec)
        elif isinstance(rec, dict) and "messages" in rec:
            out.append([Message(role=m["role"], content=m["content"]) for m in rec["messages"]])
        elif isinstance(rec, dict) and ("prompt" in rec or "instruction" in rec):
            out.append(rec["prompt"] if "prompt" in rec else (rec["instruction"], rec.get("input", "")))
        else:
            cli.refuse(PROG, f"{path}:{i + 1}: expected a string or an object with prompt / instruction / messages")
    if not out:
        cli.refuse(PROG, f"{path}: no prompts")
    return out


def _encode(item, tok, args) -> list[int]:
    """A prompt item -> ids (through the chat template when one is given)."""
    if isinstance(item, list):  # messages
        return render(tok, args.prompt_type or "empty", item).ids
    if isinstance(item, tuple):  # alpaca instruction, input
        instr, inp = item
        if not args.prompt_type:
            return tok.encode(instr + ("\n" + inp if inp else ""), bos=tok.add_bos)
        t = get_template(args.prompt_type)
        return render(tok, t, _with_system(args, [Message(role="user", content=t.join_input(instr, inp))]),
                      with_input=bool(inp)).ids
    if args.prompt_type:
        return render(tok, args.prompt_type, _with_system(args, [Message(role="user", content=item)])).ids
    return tok.encode(item, bos=tok.add_bos)


def _with_system(args, msgs):
    return ([Message(role="system", content=args.system)] if args.system else []) + msgs


def main(argv=None) -> int:
    args = parse_args(argv)
    L = ic.load(args, PROG)
    tok, launch = L.tokenizer, L.launch
    stops = [tok.eos_id] if tok.eos_id is not None else []
    if args.prompt_type:
        from pmodel.inference.chat import template_stops
        sids, sstr = template_stops(get_template(args.prompt_type), tok)
        stops = sorted(set(stops) | set(sids))
        args.stop = list(args.stop) + [s for s in sstr if s not in args.stop]
    cfg = ic.config_of(args, PROG, stop_ids=stops)
    if args.num_return_sequences != 1:
        cfg = cfg.replace(num_return_sequences=args.num_return_sequences)
    try:
        if not (args.prompt or args.input_file):
            return _demo(args, L, cfg)
        items = args.prompt if args.prompt else _read_inputs(args.input_file)
        ids = [_encode(it, tok, args) for it in items]
        if len(ids) == 1 and cfg.num_beams == 1 and not args.no_stream and not args.output_file:
            for deltas in stream(L.model, L.params, tok, ids, cfg, fast=L.fast):
                for d in deltas:
                    if launch.lead and d.text:
                        print(d.text, end="", flush=True)
            launch.say("")
            return 0
        mb = args.micro_batch_size or len(ids)
        out = open(args.output_file, "w", encoding="utf-8") if (args.output_file and launch.lead) else None
        t0, n_tok = time.perf_counter(), 0
        for s in range(0, len(ids), mb):
            res = complete(L.model, L.params, tok, ids[s:s + mb], cfg, fast=L.fast)
            for j, c in enumerate(res):
                i = s + j // cfg.num_return_sequences
                rec = {"index": i, "prompt": items[i] if isinstance(items[i], str) else str(items[i]), "text": c.text,
                       "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
                       "completion_tokens": len(c.token_ids)}
                if cfg.num_return_sequences > 1:
                    rec["beam"] = j % cfg.num_return_sequences
                n_tok += len(c.token_ids)
                if launch.lead:
                    line = json.dumps(rec, ensure_ascii=False)
                    print(line, file=out) if out else print(line, flush=True)
        if out:
            out.close()
        dt = time.perf_counter() - t0
        launch.say(f"{PROG}: {len(ids)} prompts, {n_tok} tokens in {dt:.1f}s ({n_tok / max(dt, 1e-9):.1f} tokens/s)"
                   if out else "")
    except (ValueError, NotImplementedError) as e:
        cli.refuse(PROG, str(e))
    finally:
        launch.close()
    return 0


def _demo(args, L, cfg) -> int:
    """ModelLink inference.py's demo: the fixed prompt through each task."""
    tasks = args.task or list(TASKS)
    ids = [_encode(DEMO_PROMPT, L.tokenizer, args)]
    for t in tasks:
        t = {"1": "greedy", "2": "do_sample", "3": "beam_search"}.get(t, t)
        if t not in TASKS:
            cli.refuse(PROG, f"--task {t}: expected one of {', '.join(TASKS)} (or 1, 2, 3); "
                             "beam_search_with_sampling and return_output_log_probs are not implemented; chat is "
                             "scripts/chat.py")
        c = cfg
        if t == "greedy":
            c = cfg.replace(temperature=0.0, top_k=None, top_p=None, min_p=None, num_beams=1)
        elif t == "do_sample":
            c = cfg.replace(temperature=cfg.temperature or 0.7, top_k=cfg.top_k or 50, top_p=cfg.top_p or 0.95,
                            num_beams=1)  # ModelLink's defaults
        else:
            c = cfg.replace(temperature=0.0, top_k=None, top_p=None, min_p=None, num_beams=max(cfg.num_beams, 2))
        t0 = time.perf_counter()
        res = complete(L.model, L.params, L.tokenizer, ids, c, fast=L.fast)[0]
        L.launch.say(f"=== {t}\nYou:\n{DEMO_PROMPT}\n\npmodel:\n{res.text}\n"
                     f"({len(res.token_ids)} tokens, {res.finish_reason}, {time.perf_counter() - t0:.2f}s)")
    L.launch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
