"""Instruction data: alpaca / sharegpt records -> chat-template tokens with masked prompts,
whole-turn truncation, and greedy knapsack packing.

Records:

* **alpaca**: ``instruction``, ``input`` (optional), ``output``, ``system`` (optional),
  ``history`` (optional list of ``[query, response]`` pairs, oldest first).
* **sharegpt**: ``conversations`` (list of ``{"from": ..., "value": ...}``; roles
  ``human``/``user``, ``gpt``/``assistant``/``model``, ``system``), optional ``system``.

``map_keys`` maps our field names to the record's (``{"instruction": "prompt"}`` reads the
instruction from ``prompt``); for sharegpt also ``{"messages": "conversations", "role_tag":
"from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag":
"system"}`` (the defaults shown).

Examples are stored *unshifted* (``ids``, ``labels`` with -100 on prompts) -- that is what
ModelLink writes -- and shifted when batched (``tokens = ids[:-1]``, ``labels = labels[1:]``).
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .indexed import IndexedDataset
from .templates import IGNORE_INDEX, ChatTemplate, Message, Rendered, get_template, render
from .tokenizers import Tokenizer

__all__ = ["read_records", "encode_examples", "Examples", "RecordError", "alpaca_messages", "sharegpt_messages", "truncate_turns",
           "encode_record", "shift_example", "greedy_knapsack", "pack_examples",
           "InstructionDataset"]


class RecordError(ValueError):
    """A record that cannot be used; ``reason`` is a short machine-friendly tag."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _get(record: Mapping[str, Any], key: str, map_keys: Mapping[str, str], *, required: bool,
         kind=str, default=None):
    name = map_keys.get(key, key)
    if name not in record:
        if required:
            raise RecordError("missing_key", f"missing key {name!r} (expected a {kind.__name__})")
        return default
    v = record[name]
    if v is None and not required:
        return default
    if not isinstance(v, kind):
        raise RecordError("wrong_type", f"key {name!r}: expected {kind.__name__}, got {type(v).__name__}")
    return v


def alpaca_messages(record: Mapping[str, Any], template: ChatTemplate,
                    map_keys: Mapping[str, str] | None = None) -> tuple[list[Message], bool]:
    """Messages of an alpaca record.

    Args:
        record: the JSON object.
        template: the chat template (decides how ``input`` joins the instruction).
        map_keys: field renames (``{"instruction": "prompt", ...}`` means read ``prompt``).

    Returns:
        ``(messages, with_input)``.
    """
    if not isinstance(record, Mapping):
        raise RecordError("wrong_type", f"expected a JSON object, got {type(record).__name__}")
    mk = dict(map_keys or {})
    instruction = _get(record, "instruction", mk, required=True)
    inp = _get(record, "input", mk, required=False, default="")
    output = _get(record, "output", mk, required=True)
    system = _get(record, "system", mk, required=False, default="")
    history = _get(record, "history", mk, required=False, kind=list, default=[])
    if not (instruction.strip() or inp.strip()):
        raise RecordError("empty_text", "empty instruction and input")
    if not output.strip():
        raise RecordError("empty_text", f"empty {mk.get('output', 'output')!r}")
    msgs = [Message(role="system", content=system)] if system else []
    for k, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RecordError("wrong_type", f"history[{k}]: expected [query, response] strings")
        msgs += [Message(role="user", content=pair[0]), Message(role="assistant", content=pair[1])]
    msgs += [Message(role="user", content=template.join_input(instruction, inp)),
             Message(role="assistant", content=output)]
    return msgs, bool(inp) and not history


_USER = ("human", "user")
_ASSISTANT = ("gpt", "assistant", "model", "bot")


def sharegpt_messages(record: Mapping[str, Any], map_keys: Mapping[str, str] | None = None) -> list[Message]:
    """Messages of a sharegpt record.

    Args:
        record: the JSON object.
        map_keys: field/role renames (see module docstring).

    Returns:
        The messages.
    """
    if not isinstance(record, Mapping):
        raise RecordError("wrong_type", f"expected a JSON object, got {type(record).__name__}")
    map_keys = map_keys or {}
    conv = _get(record, "conversations", {"conversations": map_keys.get("messages", "conversations")},
                required=True, kind=list)
    role_tag = map_keys.get("role_tag", "from")
    content_tag = map_keys.get("content_tag", "value")
    user_tags = (map_keys["user_tag"],) if "user_tag" in map_keys else _USER
    asst_tags = (map_keys["assistant_tag"],) if "assistant_tag" in map_keys else _ASSISTANT
    sys_tag = map_keys.get("system_tag", "system")
    system = _get(record, "system", map_keys, required=False, default="")
    msgs: list[Message] = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, Mapping) or not isinstance(turn.get(role_tag), str) \
                or not isinstance(turn.get(content_tag), str):
            raise RecordError("wrong_type", f"conversations[{k}]: expected {{{role_tag!r}: str, {content_tag!r}: str}}")
        role = turn[role_tag]
        if role == sys_tag and k == 0:
            system = turn[content_tag]
            continue
        if role in user_tags:
            r = "user"
        elif role in asst_tags:
            r = "assistant"
        else:
            raise RecordError("bad_role", f"conversations[{k}]: unknown role {role!r}")
        msgs.append(Message(role=r, content=turn[content_tag]))
    # Training needs complete exchanges: drop a trailing unanswered user turn.
    if msgs and msgs[-1].role == "user":
        msgs = msgs[:-1]
    if not msgs:
        raise RecordError("empty_text", "no complete user/assistant exchange")
    for k, m in enumerate(msgs):
        if m.role != ("user" if k % 2 == 0 else "assistant"):
            raise RecordError("bad_role", f"turn {k}: roles must alternate user/assistant, got {m.role!r}")
        if m.role == "assistant" and not m.content.strip():
            raise RecordError("empty_text", f"turn {k}: empty assistant message")
    return ([Message(role="system", content=system)] if system else []) + msgs


def truncate_turns(r: Rendered, max_len: int) -> Rendered | None:
    """Keep the longest run of whole leading exchanges that fits ``max_len`` ids.

    Args:
        r: a rendered conversation.
        max_len: the most ids a sample may have.

    Returns:
        The truncated :class:`Rendered`, or ``None`` if even the first exchange is too long.
    """
    if len(r.ids) <= max_len:
        return r
    keep = [e for e in r.turn_ends if e <= max_len]
    if not keep:
        return None
    n = keep[-1]
    return Rendered(ids=r.ids[:n], labels=r.labels[:n], turn_ends=keep)


def encode_record(record: Mapping[str, Any], tokenizer: Tokenizer, template: ChatTemplate | str,
                  *, style: str = "alpaca", map_keys: Mapping[str, str] | None = None,
                  max_len: int | None = None) -> Rendered | None:
    """Tokenise one instruction record.

    Args:
        record: alpaca or sharegpt JSON object.
        tokenizer: the tokenizer.
        template: chat template or its name.
        style: ``alpaca`` or ``sharegpt``.
        map_keys: field renames.
        max_len: drop later turns beyond this many ids (``None``: no limit).

    Returns:
        :class:`Rendered`, or ``None`` when the first exchange alone exceeds ``max_len``.
    """
    t = get_template(template) if isinstance(template, str) else template
    if style == "alpaca":
        msgs, with_input = alpaca_messages(record, t, map_keys)
    elif style == "sharegpt":
        msgs, with_input = sharegpt_messages(record, map_keys), False
    else:
        raise ValueError(f"unknown instruction style {style!r}; expected alpaca or sharegpt")
    r = render(tokenizer, t, msgs, with_input=with_input)
    return truncate_turns(r, max_len) if max_len is not None else r


def shift_example(ids: Sequence[int], labels: Sequence[int]) -> dict[str, np.ndarray]:
    """Shift one unshifted example into the batch convention.

    Args:
        ids: token ids (n,).
        labels: unshifted labels (n,), -100 on prompts.

    Returns:
        ``tokens`` (n-1,), ``labels`` (n-1,), ``loss_mask`` (n-1,) float32,
        ``position_ids`` (n-1,) and ``seq_lens`` ([n-1]).
    """
    ids_a = np.asarray(ids, dtype=np.int64)
    lab = np.asarray(labels, dtype=np.int64)
    tokens, tgt = ids_a[:-1], lab[1:]  # (n-1,)
    return {"tokens": tokens, "labels": tgt, "loss_mask": (tgt != IGNORE_INDEX).astype(np.float32),
            "position_ids": np.arange(len(tokens), dtype=np.int64),
            "seq_lens": np.asarray([len(tokens)], dtype=np.int64)}


def read_records(path: str | Path) -> list:
    """The records of a raw instruction file: a ``.json`` array or ``.jsonl`` lines.

    Raises:
      ValueError: naming the file and line of invalid JSON or of bytes that are not UTF-8, or a
        ``.json`` that is not an array.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})") from None
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


class Examples:
    """Shifted examples in memory, with the ``sample(i)`` / ``len`` a MicroBatchLoader reads."""

    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, i: int):
        return self.examples[i]


def encode_examples(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, template: ChatTemplate | str, *,
                    style: str = "alpaca", map_keys: Mapping[str, str] | None = None,
                    seq_length: int | None = None, rejects: list | None = None) -> tuple[Examples, dict[str, int]]:
    """Tokenise and shift raw records into training examples, counting what is skipped.

    Args:
      records: alpaca / sharegpt objects; tokenizer, template, style, map_keys: as
        :func:`encode_record`.
      seq_length: training positions per example at most (later turns are dropped; a record
        whose first exchange is longer is skipped as ``too_long``).
      rejects: when given, ``(record index, reason, message)`` of each skipped record is appended.

    Returns:
      ``(examples, skipped)``; ``skipped`` counts records by reason (a :class:`RecordError`
      reason, ``too_long`` or ``no_response_tokens``); nothing is dropped without a count.
    """
    examples, skipped = [], {}

    def skip(i: int, reason: str, msg: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if rejects is not None:
            rejects.append((i, reason, msg))
    for i, rec in enumerate(records):
        try:  # +1: shifting drops one token
            r = encode_record(rec, tokenizer, template, style=style, map_keys=map_keys,
                              max_len=seq_length + 1 if seq_length is not None else None)
        except RecordError as e:
            skip(i, e.reason, str(e))
            continue
        if r is None:
            skip(i, "too_long", f"the first exchange is longer than seq_length {seq_length}")
            continue
        ex = shift_example(r.ids, r.labels)
        if ex["loss_mask"].sum() == 0:
            skip(i, "no_response_tokens", "no response token to train on")
            continue
        examples.append(ex)
    return Examples(examples), skipped


def greedy_knapsack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group items into bins of at most ``capacity`` (first-fit decreasing).

    Args:
        lengths: item sizes.
        capacity: bin size.

    Returns:
        Bins as lists of item indices; every item appears exactly once (items larger than
        ``capacity`` raise).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} of length {n} exceeds the pack capacity {capacity}")
        for b in range(len(bins)):
            if free[b] >= n:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(capacity - n)
    return bins


def pack_examples(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate shifted examples into one packed example.

    Position ids restart at 0 for each sample and ``seq_lens`` records the boundaries, so the
    collator can build ``cu_seqlens`` and attention never crosses samples.

    Args:
        examples: outputs of :func:`shift_example`.

    Returns:
        One example with the same keys.
    """
    return {
        "tokens": np.concatenate([e["tokens"] for e in examples]),
        "labels": np.concatenate([e["labels"] for e in examples]),
        "loss_mask": np.concatenate([e["loss_mask"] for e in examples]),
        "position_ids": np.concatenate([e["position_ids"] for e in examples]),
        "seq_lens": np.concatenate([e["seq_lens"] for e in examples]),
    }


class InstructionDataset:
    """Instruction examples from ``preprocess_data`` output (``{prefix}_packed_input_ids_document``
    and ``{prefix}_packed_labels_document``), packed or not.

    Each document is one example; a packed document holds several sequences (one per packed
    sample) and is returned as one packed example with per-sample position ids.

    Args:
        prefix: the ``--output-prefix`` given to preprocess_data (``..._packed`` suffix
            optional), or the explicit input-ids prefix.
    """

    def __init__(self, prefix: str | Path):
        prefix = str(prefix)
        for cand in (prefix, prefix + "_packed"):
            if Path(cand + "_input_ids_document.idx").exists():
                prefix = cand
                break
        else:
            if prefix.endswith("_input_ids_document"):
                prefix = prefix[: -len("_input_ids_document")]
        self.ids = IndexedDataset(prefix + "_input_ids_document")
        self.labels = IndexedDataset(prefix + "_labels_document")
        if len(self.ids) != len(self.labels) or \
                not np.array_equal(self.ids.sequence_lengths, self.labels.sequence_lengths):
            raise ValueError(f"{prefix}: input_ids and labels datasets disagree in sequence lengths")
        self.prefix = prefix

    def __len__(self) -> int:
        return self.ids.num_documents

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Example ``i`` (shifted; packed documents give a packed example)."""
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"{self.prefix}: example {i} outside [0, {n})")
        parts = [shift_example(a, b) for a, b in zip(self.ids.document(i), self.labels.document(i))]
        return parts[0] if len(parts) == 1 else pack_examples(parts)

    __getitem__ = sample
