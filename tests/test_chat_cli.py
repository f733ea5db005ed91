"""scripts/chat.py driven through a pseudo-terminal: streamed replies, history truncation with a
notice, /reset, /exit; and the chat template stops."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path


import pmodel
from pmodel.data.templates import get_template
from pmodel.inference.chat import template_stops

ROOT = Path(__file__).resolve().parents[1]


class Term:
    """A child process on a pseudo-terminal (as a user's shell runs it)."""

    def __init__(self, args):
        self.master, slave = pty.openpty()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.out = b""
        self.pos = 0  # everything before was consumed by an earlier expect

    def expect(self, text: str, timeout: float = 120.0) -> str:
        """Read until ``text`` appears after what earlier calls consumed; returns the output from
        there up to and including ``text``."""
        end = time.time() + timeout
        while text.encode() not in self.out[self.pos:]:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {text!r}; got:\n{self.out.decode(errors='replace')}")
            r, _, _ = select.select([self.master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:
                    chunk = b""
                if not chunk and self.proc.poll() is not None:
                    raise AssertionError(f"exited ({self.proc.returncode}) before {text!r}:\n{self.out.decode()}")
                self.out += chunk
        i = self.out.index(text.encode(), self.pos) + len(text.encode())
        seg, self.pos = self.out[self.pos:i], i
        return seg.decode(errors="replace")

    def send(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def test_chat_in_a_pseudo_terminal(shared_data):
    model = shared_data / "models" / "stories260K"
    t = Term([sys.executable, "scripts/chat.py", "--load-hf", str(model), "--prompt-type", "empty",
              "--temperature", "0", "--max-new-tokens", "24", "--seq-length", "96"])
    try:
        t.expect("You >> ")
        t.send("Once upon a time")
        out = t.expect("You >> ", 120)
        first = out.split("Assistant >> ", 1)[1].split("\r\nYou >> ")[0]
        assert "Lily" in first  # stories260K's greedy continuation, streamed to the terminal
        later = ""
        for line in ("Lily went to the park", "The dog was happy and", "She saw a big red ball"):
            t.send(line)
            later += t.expect("You >> ")
        assert "[history truncated: dropped the" in later and "to fit the context of 96 tokens]" in later
        t.send("/reset")
        t.expect("[history cleared]")
        t.expect("You >> ")
        t.send("Once upon a time")
        again = t.expect("You >> ")
        # after /reset the same first message gets the same (greedy) reply as at the start
        assert again.split("Assistant >> ", 1)[1].split("\r\nYou >> ")[0] == first
        t.send("/exit")
        assert t.proc.wait(60) == 0
    finally:
        t.close()


def test_template_stops(shared_data):
    l2 = pmodel.data.load_tokenizer(shared_data / "tokenizers" / "llama2" / "tokenizer.model")
    ids, strings = template_stops(get_template("llama2"), l2)
    assert ids == [2] and strings == ["[INST]"]
    ids, strings = template_stops(get_template("alpaca"), l2)
    assert strings == ["### Instruction:"]
    q = pmodel.data.load_tokenizer(shared_data / "tokenizers" / "qwen" / "qwen.tiktoken")
    ids, strings = template_stops(get_template("chatml"), q)
    assert q.special_tokens["<|im_end|>"] in ids and strings == []
