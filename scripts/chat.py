#!/usr/bin/env python
"""Chat with a model in the terminal, replies streamed as they are generated.

    python scripts/chat.py --load-hf models/qwen-chat                      # the family's template
    python scripts/chat.py --load-hf base --lora-load adapter --prompt-type alpaca --system "Be brief."
    python -m torch.distributed.run --nproc-per-node 2 scripts/chat.py --load-hf base --tensor-model-parallel-size 2

The conversation is rendered with the chat template (``--prompt-type``, default the model
family's) and kept across turns; when it would overflow the context (``--seq-length`` /
``--max-length``, default the model's) the oldest exchanges are dropped and a notice says so.
Commands: ``/reset`` (or ModelLink's ``clear`` / ``new``) forgets the history, ``/exit`` (or
``exit``, ``quit``, ``q``, end of input) quits. Sampling defaults to ModelLink's chat task
(temperature 0.7, top-k 50, top-p 0.95); ``--temperature 0`` is greedy.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common as cli  # noqa: E402
import infer_common as ic  # noqa: E402

from pmodel.inference import ChatSession  # noqa: E402

PROG = "chat.py"
RESET, EXIT = ("/reset", "clear", "new"), ("/exit", "exit", "quit", "q")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ic.add_model_flags(ap)
    ic.add_sampling_flags(ap, max_new_default=256)
    g = ap.add_argument_group("chat")
    g.add_argument("--prompt-type", "--inference-prompt-type", dest="prompt_type", default=None,
                   help="chat template (default: the model family's)")
    g.add_argument("--system", default=None, help="system prompt")
    return ap.parse_args(argv)


def _broadcast(text, launch):
    """Rank 0 reads the terminal; under TP every rank must run the same turn."""
    if launch.world == 1:
        return text
    import torch.distributed as dist
    box = [text]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.num_beams != 1:
        cli.refuse(PROG, "--num-beams: chat streams its replies; beam search has no incremental output")
    L = ic.load(args, PROG)
    if args.temperature is None:
        args.temperature = 0.7
        args.top_k = 50 if args.top_k is None else args.top_k
        args.top_p = 0.95 if args.top_p is None else args.top_p
    cfg = ic.config_of(args, PROG)
    try:
        chat = ChatSession(L.model, L.params, L.tokenizer, template=args.prompt_type, system=args.system, config=cfg)
    except ValueError as e:
        cli.refuse(PROG, str(e))
    launch = L.launch
    launch.say(f"chat ({chat.template.name} template). /reset clears the history, /exit quits.")
    try:
        while True:
            line = None
            if launch.lead:
                try:
                    line = input("You >> ")
                except EOFError:
                    line = "/exit"
            line = _broadcast(line, launch).strip()
            if line in EXIT:
                break
            if line in RESET:
                chat.reset()
                launch.say("[history cleared]")
                continue
            if not line:
                continue
            n = len(chat.notices)
            try:
                reply = chat.send(line)
                first = next(reply, "")  # renders the prompt (truncating the history) and starts the reply
                for notice in chat.notices[n:]:
                    launch.say(notice)
                if launch.lead:
                    print("Assistant >> " + first, end="", flush=True)
                for delta in reply:
                    if launch.lead:
                        print(delta, end="", flush=True)
                launch.say("")
            except ValueError as e:  # a message that cannot fit the context
                launch.say(f"[{e}]")
    finally:
        launch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
