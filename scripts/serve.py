#!/usr/bin/env python
"""Serve a model over an OpenAI-compatible HTTP API (FastAPI + uvicorn).

    python scripts/serve.py --load-hf models/qwen-chat --port 8000
    python scripts/serve.py --load-hf base --lora-load adapter --served-model-name my-model

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="my-model", messages=[{"role": "user", "content": "hi"}])

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (with
``"stream": true``: server-sent events ending in ``data: [DONE]``). Invalid requests get a 400
(404 for an unknown model) with an OpenAI-style ``{"error": {"message": ...}}`` body. Concurrent
requests with equal settings run as one batch (``--max-batch``); others queue. Needs the
``serve`` extra: ``pip install -e '.[serve]'``. Tensor parallel serving is not offered (the
server would have to broadcast every request to the other ranks): use generate.py / chat.py
under torchrun for TP.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_common as cli  # noqa: E402
import infer_common as ic  # noqa: E402

PROG = "serve.py"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ic.add_model_flags(ap)
    g = ap.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    g.add_argument("--prompt-type", default=None, help="chat template of /v1/chat/completions (default: the family's)")
    g.add_argument("--max-batch", type=int, default=8, help="concurrent requests batched together at most")
    g.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens of a completion that gives none")
    args = ap.parse_args(argv)
    if args.tensor_model_parallel_size != 1:
        cli.refuse(PROG, "--tensor-model-parallel-size: serving runs one process (use generate.py / chat.py under "
                         "torchrun for tensor parallel inference)")
    try:
        import uvicorn
        from pmodel.inference.server import create_app
        import fastapi  # noqa: F401
    except ImportError as e:
        cli.refuse(PROG, f"the server needs FastAPI and uvicorn ({e}): pip install -e '.[serve]'")
    L = ic.load(args, PROG)
    name = args.served_model_name or Path(args.load_hf or args.load).name
    try:
        app = create_app(L.model, L.params, L.tokenizer, model_name=name, template=args.prompt_type,
                         max_batch=args.max_batch, fast=L.fast, default_max_tokens=args.default_max_tokens)
    except ValueError as e:
        cli.refuse(PROG, str(e))
    print(f"{PROG}: serving {name!r} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
