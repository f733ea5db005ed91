"""Text out of token ids, incrementally: a streaming detokenizer and stop-string matching.

:class:`Detokenizer` turns ids into text deltas as they arrive and never emits part of a
character: a UTF-8 character split over several byte tokens (SentencePiece byte fallback
``<0xE4><0xBD><0xA0>``, byte-level BPE) decodes to U+FFFD until its last byte arrives, so a
delta is held back while the decoded window ends in U+FFFD. Decoding a short window of recent ids
(not the whole text) keeps each step O(window); the window starts a few tokens back so that
SentencePiece's word-boundary spaces come out as in the full decode.

:class:`StopMatcher` finds stop strings in the streamed text, including a stop string split
across tokens, and holds back the text that could still become one.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["Detokenizer", "StopMatcher"]

_REPLACEMENT = "\ufffd"


class Detokenizer:
    """Incremental ``ids -> text``.

    Args:
      tokenizer: anything with ``decode(ids) -> str``.
      context: ids that precede the generated ones (e.g. the prompt's last tokens); they are
        decoded only to place word boundaries, never emitted.
      skip_ids: ids never fed to ``decode`` (e.g. stop tokens).

    The concatenation of all deltas (plus :meth:`flush`) equals the text the generated ids add
    to the context: ``decode(context + ids)`` minus ``decode(context)``; with no context, ``decode(ids)``.
    """

    def __init__(self, tokenizer, context: Sequence[int] = (), *, skip_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = [int(i) for i in context][-6:]
        self.prefix = 0  # window start
        self.read = len(self.ids)  # ids before this are already emitted (or context)
        self.skip = set(int(i) for i in skip_ids)
        self.text = ""  # everything emitted so far

    def push(self, token: int) -> str:
        """Add one id; returns the new complete text ('' while a character is incomplete)."""
        token = int(token)
        if token in self.skip:
            return ""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT) or not after.startswith(before):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text of ids still held back (an incomplete character decodes to U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        delta = after[len(before):] if after.startswith(before) else after
        self.prefix = self.read = len(self.ids)
        self.text += delta
        return delta


class StopMatcher:
    """Cut streamed text at the first stop string.

    ``push(text)`` returns ``(safe_text, stopped)``: the text that can be shown now (everything
    before a stop string, or before a suffix that may still grow into one) and whether a stop
    string was found; after a stop nothing more is returned.
    """

    def __init__(self, stops: Sequence[str] = ()):
        stops = [s for s in stops if s]
        self.stops = list(stops)
        self.buf = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        self.buf += text
        cut = min((i for i in (self.buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buf, self.stopped = self.buf[:cut], "", True
            return out, True
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        out = self.buf[: len(self.buf) - hold]
        self.buf = self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        """Text held back when generation ends without a stop string."""
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out
