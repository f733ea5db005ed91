"""scripts/serve.py tested with the official openai client, as a user calls it: models list,
completions and chat completions (non-streaming and streaming) equal the library's output, two
concurrent requests get their own outputs, malformed requests get a 4xx with a message."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import pmodel  # noqa: E402
from pmodel.data.templates import Message, render  # noqa: E402
from pmodel.inference import GenerationConfig, complete  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    from conftest import SHARED_DATA
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present (fresh clone); this test needs the real test data")
    path = SHARED_DATA / "models" / "stories260K"
    port = _port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "scripts/serve.py", "--load-hf", str(path), "--port", str(port),
                             "--served-model-name", "stories", "--prompt-type", "empty"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    for _ in range(240):
        if proc.poll() is not None:
            raise AssertionError(f"serve.py exited: {proc.stdout.read()}")
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            time.sleep(0.5)
    model, params = pmodel.load_hf(path)
    tok = pmodel.data.load_tokenizer(path)
    yield client, model, params, tok
    proc.terminate()
    proc.wait(30)


def test_models_and_completions(server):
    client, model, params, tok = server
    assert [m.id for m in client.models.list().data] == ["stories"]
    want = complete(model, params, tok, ["Once upon a time"],
                    GenerationConfig(max_new_tokens=40, stop_ids=(2,)))[0]
    r = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=40, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == len(want.token_ids)
    # streaming: the deltas join to the same text
    parts = [c.choices[0].text for c in client.completions.create(model="stories", prompt="Once upon a time",
                                                                   max_tokens=40, temperature=0, stream=True)]
    assert "".join(parts) == want.text and len(parts) > 3
    # a stop string cuts the text before it
    stop = want.text[20:26]
    r = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=40, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == want.text[: want.text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_chat_completions(server):
    client, model, params, tok = server
    msgs = [{"role": "user", "content": "Lily went to the park"}]
    ids = render(tok, "empty", [Message(**m) for m in msgs]).ids
    want = complete(model, params, tok, [ids], GenerationConfig(max_new_tokens=30, stop_ids=(2,)))[0]
    r = client.chat.completions.create(model="stories", messages=msgs, max_tokens=30, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    chunks = list(client.chat.completions.create(model="stories", messages=msgs, max_tokens=30, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_two_concurrent_requests_keep_their_outputs(server):
    client, model, params, tok = server
    prompts = ["Once upon a time", "The cat sat on the"]
    want = [complete(model, params, tok, [p], GenerationConfig(max_new_tokens=48, stop_ids=(2,)))[0].text
            for p in prompts]
    got = [None, None]

    def ask(i):
        parts = client.completions.create(model="stories", prompt=prompts[i], max_tokens=48, temperature=0,
                                          stream=True)
        got[i] = "".join(c.choices[0].text for c in parts)

    for _ in range(2):  # twice, so at least one round overlaps in the server
        ts = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)
        assert got == want


def test_bad_requests_get_4xx_with_a_message(server):
    client = server[0]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="stories", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="stories", messages=[])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="stories", prompt=[[100000]])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="stories", prompt="a " * 600)
    with pytest.raises(openai.BadRequestError, match="invalid request"):
        client.post("/completions", body={"model": "stories"}, cast_to=object)  # no prompt
