"""An OpenAI-compatible HTTP API over a model: ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (non-streaming and server-sent events), on FastAPI.

One worker thread owns the model. Requests wait in a queue; the worker takes every waiting
request whose generation settings equal the first one's (greedy requests with different
prompts, say) and runs them as one left-padded batch, routing each row's deltas to its own
request — so concurrent requests are batched when they can be and queued otherwise, and their
outputs never mix. Sampled requests with a seed run alone, so the seed alone decides their
tokens.

FastAPI (and pydantic) are imported only when :func:`create_app` is called: ``import pmodel``
never needs them (``pip install pmodel[serve]``).
"""
# No `from __future__ import annotations`: FastAPI reads the request models of the
# handlers defined in create_app from their (local) annotation objects.
import asyncio
import dataclasses
import json
import queue
import threading
import time
import uuid
from typing import Any

from ..data.templates import Message, get_template, render
from ..model import Model
from .chat import template_stops
from .engine import GenerationConfig, stream

__all__ = ["create_app", "Scheduler"]


@dataclasses.dataclass
class _Job:
    ids: list[int]
    cfg: GenerationConfig
    out: asyncio.Queue
    loop: asyncio.AbstractEventLoop

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Scheduler:
    """The worker thread: batches compatible queued jobs, runs them, routes the deltas.

    Args:
      model, params, tokenizer: the model.
      max_batch: rows per batch at most.
      fast: the decode-step choice (see :class:`~pmodel.inference.decode.Decoder`).
    """

    def __init__(self, model: Model, params, tokenizer, *, max_batch: int = 8, fast: bool | str = "auto"):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_batch, self.fast = max_batch, fast
        self.jobs: queue.Queue = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (for tests and logs)
        self.thread = threading.Thread(target=self._run, name="pmodel-generate", daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.jobs.put(job)

    def _take(self) -> list[_Job]:
        first = self.jobs.get()
        if first is None:
            return []
        batch, rest = [first], []
        solo = first.cfg.seed is not None and first.cfg.temperature > 0
        while not solo and len(batch) < self.max_batch:
            try:
                j = self.jobs.get_nowait()
            except queue.Empty:
                break
            if j is None:
                rest.append(j)
                break
            (batch if j.cfg == first.cfg else rest).append(j)
        for j in rest:  # back in the queue, in order, for a later batch
            self.jobs.put(j)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            self.batches.append(len(batch))
            try:
                for deltas in stream(self.model, self.params, self.tokenizer, [j.ids for j in batch], batch[0].cfg,
                                     fast=self.fast):
                    for d in deltas:
                        batch[d.index].put(d)
            except Exception as e:  # report to every waiting request, keep serving
                for j in batch:
                    j.put(e)

    def close(self) -> None:
        self.jobs.put(None)


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def create_app(model: Model, params, tokenizer, *, model_name: str = "pmodel", template: str | None = None,
               max_batch: int = 8, fast: bool | str = "auto", default_max_tokens: int = 16):
    """The FastAPI app.

    Args:
      model, params, tokenizer: the model.
      model_name: the id ``/v1/models`` lists and requests must name.
      template: the chat template of ``/v1/chat/completions`` (default: the family's).
      max_batch: rows per batch at most.
      fast: the decode-step choice.
      default_max_tokens: ``max_tokens`` of a completion request that gives none (OpenAI: 16).

    Returns:
      a FastAPI application (serve it with uvicorn); ``app.state.scheduler`` is the worker.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    if template is None:
        from .. import families
        try:
            template = families.get(model.family).chat_template if model.family else "default"
        except (KeyError, ValueError):
            template = "default"
    chat_template = get_template(template)
    chat_ids, chat_strings = template_stops(chat_template, tokenizer)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    limit = model.config.max_position_embeddings

    class _Common(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        n: int = Field(default=1, ge=1)
        stream: bool = False
        stop: str | list[str] | None = None
        seed: int | None = None
        presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
        frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
        logprobs: Any = None

    class CompletionRequest(_Common):
        prompt: str | list[str] | list[int] | list[list[int]]
        echo: bool = False

    class ChatMessage(BaseModel):
        role: str
        content: str

    class ChatRequest(_Common):
        messages: list[ChatMessage] = Field(min_length=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)

    app = FastAPI(title="pmodel OpenAI-compatible API")
    sched = Scheduler(model, params, tokenizer, max_batch=max_batch, fast=fast)
    app.state.scheduler = sched

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        parts = []
        for e in errs[:3]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        param = ".".join(str(x) for x in errs[0].get("loc", ()) if x != "body") if errs else None
        return _error(400, "invalid request: " + "; ".join(parts), param)

    @app.on_event("shutdown")
    def _stop():
        sched.close()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "pmodel"}]}

    def _check(req: _Common):
        if req.model != model_name:
            return _error(404, f"model {req.model!r} does not exist; this server has {model_name!r}", "model",
                          "not_found_error")
        if req.n != 1:
            return _error(400, f"n={req.n}: one choice per request is supported (send n requests)", "n")
        if req.logprobs not in (None, False, 0):
            return _error(400, "logprobs are not supported", "logprobs")
        return None

    def _config(req: _Common, max_tokens: int | None, stop_ids, stop_strings) -> GenerationConfig:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenerationConfig(max_new_tokens=max_tokens or default_max_tokens, temperature=req.temperature,
                                top_p=req.top_p if req.top_p < 1.0 else None, seed=req.seed,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                                stop_ids=tuple(stop_ids), stop_strings=tuple(stops) + tuple(stop_strings))

    async def _submit(ids: list[int], cfg: GenerationConfig) -> asyncio.Queue:
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {limit}")
        q: asyncio.Queue = asyncio.Queue()
        sched.submit(_Job(ids=ids, cfg=cfg, out=q, loop=asyncio.get_running_loop()))
        return q

    async def _deltas(q: asyncio.Queue):
        while True:
            d = await q.get()
            if isinstance(d, Exception):
                raise d
            yield d
            if d.finish_reason is not None:
                return

    def _usage(p: int, c: int) -> dict:
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _respond(req, ids, cfg, kind: str):
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            q = await _submit(ids, cfg)
        except ValueError as e:
            return _error(400, str(e), "prompt" if kind == "text" else "messages")

        def chunk(text: str | None, finish: str | None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            async def events():
                if kind == "chat":
                    yield f"data: {json.dumps(chunk(None, None, role=True))}\n\n"
                async for d in _deltas(q):
                    if d.text or d.finish_reason:
                        yield f"data: {json.dumps(chunk(d.text, d.finish_reason), ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        text, n_tok, reason = [], 0, "length"
        async for d in _deltas(q):
            text.append(d.text)
            n_tok += len(d.token_ids)
            reason = d.finish_reason or reason
        body = "".join(text)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": body}, "logprobs": None,
                      "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": (tokenizer.decode(ids) if req.echo else "") + body, "logprobs": None,
                      "finish_reason": reason}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                             "usage": _usage(len(ids), n_tok)})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        bad = _check(req)
        if bad is not None:
            return bad
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                return _error(400, f"prompt: a list of {len(p)} prompts; send one prompt per request", "prompt")
            p = p[0]
        if isinstance(p, str):
            ids = tokenizer.encode(p, bos=tokenizer.add_bos)
        else:
            ids = [int(i) for i in p]
            if not ids or min(ids) < 0 or max(ids) >= model.config.vocab_size:
                return _error(400, f"prompt: token ids must be in [0, {model.config.vocab_size})", "prompt")
        if req.echo and req.stream:
            return _error(400, "echo with stream is not supported", "echo")
        return await _respond(req, ids, _config(req, req.max_tokens, eos, ()), "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        bad = _check(req)
        if bad is not None:
            return bad
        try:
            msgs = [Message(role=m.role, content=m.content) for m in req.messages]
            if msgs[-1].role != "user":
                raise ValueError("the last message must come from the user")
            ids = render(tokenizer, chat_template, msgs).ids
        except (ValueError, TypeError) as e:
            return _error(400, f"messages: {e}", "messages")
        cfg = _config(req, req.max_completion_tokens or req.max_tokens or None, chat_ids, chat_strings)
        if not (req.max_completion_tokens or req.max_tokens):
            cfg = cfg.replace(max_new_tokens=max(1, min(limit - len(ids), 512)))
        return await _respond(req, ids, cfg, "chat")

    return app
