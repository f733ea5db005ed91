"""Raw text / JSON / parquet -> tokenised ``MMIDIDX`` datasets (the engine behind
``scripts/preprocess_data.py``, with ModelLink's handlers and output names).

Inputs, read as streams with memory bounded by the task size: ``.jsonl`` (one JSON object per
line), ``.json`` (an array of objects, parsed incrementally), ``.txt`` (one document per line;
blank lines are skipped and counted), ``.parquet`` (pyarrow, one row group at a time), each
optionally compressed (``.gz``; ``.zst`` through pyarrow's zstd codec). A directory is expanded
to its files of those kinds (sorted by name), a pattern with ``*`` / ``?`` / ``[`` is a glob.

Handlers: see :mod:`pmodel.data.handlers` (ModelLink's) and, with chat templates,
``AlpacaStyleInstructionHandler`` / ``SharegptStyleInstructionHandler``: records rendered with
``prompt_type`` into ``{prefix}_packed_input_ids_document``, ``..._labels_document`` (-100 on
prompts) and ``..._attention_mask_document``; with ``pack`` each document holds several samples
(one sequence each), grouped by greedy knapsack up to ``seq_length`` training positions.

How the work is split: uncompressed ``.jsonl`` / ``.txt`` files are cut into byte ranges of about
``task_bytes`` at line starts; a worker process reads its range itself, parses, tokenises (the
tokenizer library's batch call) and sends back one contiguous token array per output key plus the
sequence lengths (no per-record Python objects cross processes). Other inputs are read by the
parent in order and shipped as raw chunks (lines) or row-group numbers (parquet). Results are
written in input order, so the bytes do not depend on ``workers`` or ``task_bytes``.
``n_subs`` / ``subset_index`` cut the corpus into disjoint parts by byte offset (at line starts;
non-splittable files go whole to the part holding their first byte), so that parts can be
tokenised on separate machines and joined with :func:`merge_datasets` into the bytes of one run.

Bad records (invalid JSON or UTF-8, missing keys, wrong types, empty text, over-long samples)
are counted by reason, reported with file and line, and written to ``{prefix}_rejects.jsonl``;
nothing is dropped silently. ``strict`` makes the first one fatal.

A worker that dies makes the run fail with its exit code; workers end with the parent (Linux
parent-death signal, and a parent-pid check), so a killed run leaves no processes behind.
"""

from __future__ import annotations

import glob as _glob
import gzip
import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import queue
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .handlers import (ALL_HANDLERS, MODELLINK_INSTRUCTION_HANDLERS, PRETRAIN_HANDLERS, encode_modellink_instruction,
                       pretrain_texts)
from .indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from .instruction import RecordError, encode_record, greedy_knapsack
from .templates import get_template
from .tokenizers import Tokenizer, load_tokenizer

__all__ = ["HANDLERS", "PreprocessConfig", "PreprocessReport", "PreprocessError", "preprocess",
           "iter_input_files", "merge_datasets", "output_names"]

log = logging.getLogger("pmodel.data.preprocess")

HANDLERS = ALL_HANDLERS
_FORMATS = (".jsonl", ".json", ".txt", ".parquet")
_COMPRESSIONS = (".gz", ".zst")


class PreprocessError(ValueError):
    """A fatal bad record (``strict``) or bad configuration."""


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """Everything ``preprocess`` needs (the script maps flags onto this).

    Args:
        inputs: files, directories or glob patterns.
        output_prefix: output path prefix.
        tokenizer: tokenizer file or folder (``"bytes"`` for the byte tokenizer).
        tokenizer_kind: see :func:`pmodel.data.load_tokenizer`.
        use_fast: in a folder holding both, load ``tokenizer.json`` (True, HF's "fast" tokenizer)
            or the model's own file (False: ``tokenizer.model`` / ``*.tiktoken`` / ``vocab.json``,
            what HF's slow tokenizer wraps).
        json_keys: keys to tokenise (GeneralPretrainHandler).
        handler: one of :data:`HANDLERS`.
        prompt_type: chat template name (template instruction handlers only).
        map_keys: field renames (template instruction handlers only).
        append_eod: append EOS to each pretraining document (and to a ModelLink instruction
            sample, as ModelLink does).
        bos: ``"auto"``: prepend the tokenizer's BOS ids when its reference adds them by default
            (``Tokenizer.add_bos``; ModelLink's Hugging Face tokenizer call does the same);
            ``"always"`` / ``"never"`` override. Pretraining and ModelLink handlers only (chat
            templates place BOS themselves).
        seq_length: instruction samples with more than ``seq_length`` training positions
            (ids - 1) lose their later turns (template handlers), or are dropped and counted as
            ``too_long`` when even the first exchange is too long (ModelLink handlers: when the
            sample is). Required with ``pack``; refused for pretraining handlers.
        pack: pack template instruction samples (greedy knapsack) up to ``seq_length``.
        pack_buffer: samples considered together by one knapsack.
        workers: worker processes (1 = in-process).
        chunk_size: records per work item for inputs read by the parent (``.json``, compressed
            files are cut by ``task_bytes``); also the encode batch inside a task.
        task_bytes: input bytes per work item for line files.
        streaming: read every input as one sequential stream (no seeking: pipes and FIFOs work;
            line files are then shipped to workers in chunks instead of being read by them).
        n_subs: cut the corpus into this many disjoint parts by byte offset; without
            ``subset_index`` every part is written as ``{prefix}_sub{k}of{n}`` and the parts
            are merged into ``prefix`` (and removed), as ModelLink's ``--n-subs``.
        subset_index: write only part ``k`` of ``n_subs`` to ``output_prefix`` (for separate
            machines; join the parts with :func:`merge_datasets`).
        strict: stop at the first bad record.
        log_interval: log a progress line every this many records (0: never).
        progress: show a tqdm bar (documents/s, MB/s, tokens/s, rejects).
    """

    inputs: tuple[str, ...]
    output_prefix: str
    tokenizer: str
    tokenizer_kind: str = "auto"
    use_fast: bool = True
    json_keys: tuple[str, ...] = ("text",)
    handler: str = "GeneralPretrainHandler"
    prompt_type: str | None = None
    map_keys: Mapping[str, str] = field(default_factory=dict)
    append_eod: bool = False
    bos: str = "auto"
    seq_length: int | None = None
    pack: bool = False
    pack_buffer: int = 4096
    workers: int = 1
    chunk_size: int = 256
    task_bytes: int = 4 << 20
    streaming: bool = False
    n_subs: int | None = None
    subset_index: int | None = None
    strict: bool = False
    log_interval: int = 1000
    progress: bool = True

    def __post_init__(self):
        # Messages name the fields as ``PreprocessConfig.<field>``; scripts/preprocess_data.py
        # turns those into its flags.
        if not self.inputs:
            raise PreprocessError("PreprocessConfig.inputs is empty")
        if self.handler not in HANDLERS:
            raise PreprocessError(f"PreprocessConfig.handler: unknown handler {self.handler!r}; "
                                  f"expected one of {HANDLERS}")
        for name in ("workers", "chunk_size", "task_bytes", "pack_buffer"):
            if getattr(self, name) < 1:
                raise PreprocessError(f"PreprocessConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.bos not in ("auto", "always", "never"):
            raise PreprocessError(f"PreprocessConfig.bos must be auto, always or never, got {self.bos!r}")
        if self.seq_length is not None and self.seq_length < 1:
            raise PreprocessError(f"PreprocessConfig.seq_length must be >= 1, got {self.seq_length}")
        if self.n_subs is not None and self.n_subs < 1:
            raise PreprocessError(f"PreprocessConfig.n_subs must be >= 1, got {self.n_subs}")
        if self.subset_index is not None and (self.n_subs is None or not 0 <= self.subset_index < self.n_subs):
            raise PreprocessError(f"PreprocessConfig.subset_index {self.subset_index} needs PreprocessConfig.n_subs "
                                  f"and 0 <= index < n_subs (n_subs: {self.n_subs})")
        if self.pack and (self.seq_length is None or self.handler not in ("AlpacaStyleInstructionHandler",
                                                                          "SharegptStyleInstructionHandler")):
            raise PreprocessError("PreprocessConfig.pack needs PreprocessConfig.seq_length and an instruction "
                                  "handler with a chat template in PreprocessConfig.handler "
                                  "(AlpacaStyleInstructionHandler, SharegptStyleInstructionHandler)"
                                  if self.seq_length is not None else
                                  "PreprocessConfig.pack needs PreprocessConfig.seq_length and an instruction "
                                  "handler in PreprocessConfig.handler")
        if not self.json_keys:
            raise PreprocessError("PreprocessConfig.json_keys is empty")
        if self.handler in ("AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler"):
            get_template(self.prompt_type)  # validate early
            if self.append_eod:
                # the chat template already ends every response with its own end token
                raise PreprocessError(f"PreprocessConfig.append_eod applies to GeneralPretrainHandler; "
                                      f"{self.handler} ends each response with the PreprocessConfig.prompt_type "
                                      "template's end token instead")
            if self.bos != "auto":
                raise PreprocessError(f"PreprocessConfig.bos applies to the pretraining and ModelLink handlers; "
                                      f"{self.handler}'s PreprocessConfig.prompt_type template places BOS itself")
        elif self.handler in MODELLINK_INSTRUCTION_HANDLERS:
            given = [f"PreprocessConfig.{f}" for f, v in (("prompt_type", self.prompt_type),
                                                          ("map_keys", self.map_keys or None)) if v is not None]
            if given:
                raise PreprocessError(
                    f"{', '.join(given)} apply to AlpacaStyleInstructionHandler / SharegptStyleInstructionHandler; "
                    f"{self.handler} writes ModelLink's own Alpaca prompt from fixed field names")
            if self.append_eod and self.handler.startswith("MOSS"):
                raise PreprocessError(f"PreprocessConfig.append_eod: {self.handler} ignores it in ModelLink "
                                      "(MOSSMultiTurnHandler always ends with EOS, MOSSInstructionHandler never)")
        else:
            # Pretraining documents are concatenated and cut into seq-length samples at training
            # time (PretrainConfig.seq_length, as Megatron's GPTDataset), so a long document is
            # normal data, not an error; ModelLink's GeneralPretrainHandler ignores the flag too.
            given = [f"PreprocessConfig.{f}" for f, v in (("seq_length", self.seq_length),
                                                          ("prompt_type", self.prompt_type),
                                                          ("map_keys", self.map_keys or None)) if v is not None]
            if given:
                raise PreprocessError(
                    f"{', '.join(given)} apply to the instruction handlers only; {self.handler} "
                    "tokenises whole documents (samples are cut to the sequence length when the pretraining "
                    "dataset is built)")
            if self.handler != "GeneralPretrainHandler" and tuple(self.json_keys) != ("text",):
                raise PreprocessError(f"PreprocessConfig.json_keys: {self.handler} builds its own 'text' from fixed "
                                      f"fields and writes only the text key, got {list(self.json_keys)}")

    @property
    def instruction(self) -> bool:
        return self.handler not in PRETRAIN_HANDLERS

    @property
    def templated(self) -> bool:
        return self.handler in ("AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler")


def output_names(cfg: PreprocessConfig, prefix: str | None = None) -> dict[str, str]:
    """Output key -> dataset prefix, as ModelLink names them."""
    prefix = cfg.output_prefix if prefix is None else prefix
    if cfg.instruction:
        return {k: f"{prefix}_packed_{k}_document" for k in ("input_ids", "attention_mask", "labels")}
    return {k: f"{prefix}_{k}_document" for k in cfg.json_keys}


@dataclass(kw_only=True)
class PreprocessReport:
    """What happened (returned by :func:`preprocess`).

    Attributes:
        records: records read (blank txt lines excluded).
        written: records written (samples for instruction data).
        documents: documents in the output (fewer than ``written`` when packed).
        tokens: tokens written (per first key for pretraining).
        rejected: count per reason.
        examples: up to 50 ``file:line: reason: message`` lines.
        blank_lines: blank lines skipped in ``.txt`` inputs.
        truncated: instruction samples that lost later turns to ``seq_length``.
        seconds: wall time.
        outputs: output prefixes written.
        rejects_path: the rejects file.
    """

    records: int = 0
    written: int = 0
    documents: int = 0
    tokens: int = 0
    rejected: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    blank_lines: int = 0
    truncated: int = 0
    seconds: float = 0.0
    bytes: int = 0
    outputs: list[str] = field(default_factory=list)
    rejects_path: str = ""

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> str:
        """A human-readable summary."""
        s = self.seconds or 1e-9
        lines = [
            f"records read: {self.records}, written: {self.written} ({self.documents} documents), "
            f"tokens: {self.tokens}, rejected: {self.num_rejected}",
            f"time: {self.seconds:.2f}s ({self.records / s:.1f} docs/s, {self.bytes / s / 1e6:.2f} MB/s, "
            f"{self.tokens / s:.0f} tokens/s)",
        ]
        if self.blank_lines:
            lines.append(f"blank .txt lines skipped: {self.blank_lines}")
        if self.truncated:
            lines.append(f"samples truncated to whole turns: {self.truncated}")
        if self.rejected:
            lines.append("rejected by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items())))
            lines += ["  " + e for e in self.examples[:20]]
            lines.append(f"rejects written to {self.rejects_path}")
        lines.append("outputs: " + ", ".join(self.outputs))
        return "\n".join(lines)


# -- inputs --------------------------------------------------------------------------------


def _format(p: Path) -> tuple[str, str]:
    """(format suffix, compression suffix or "") of an input path."""
    suffixes = p.suffixes
    comp = suffixes[-1] if suffixes and suffixes[-1] in _COMPRESSIONS else ""
    fmt = (suffixes[-2] if comp and len(suffixes) > 1 else (suffixes[-1] if suffixes and not comp else ""))
    return fmt, comp


def iter_input_files(inputs, *, streaming: bool = False) -> list[Path]:
    """Expand files / directories / glob patterns into the input files (sorted within each).

    Args:
        inputs: paths or patterns.
        streaming: also accept pipes and other non-regular files (read as ``.jsonl`` when the
            name has no known suffix).

    Returns:
        Files to read.
    """
    out = []
    for s in inputs:
        s = str(s)
        if any(c in s for c in "*?[") and not Path(s).exists():
            files = sorted(Path(f) for f in _glob.glob(s, recursive=True) if Path(f).is_file())
            files = [f for f in files if _format(f)[0] in _FORMATS]
            if not files:
                raise PreprocessError(f"input {s}: the pattern matches no {'/'.join(_FORMATS)} files")
            out += files
            continue
        p = Path(s)
        if p.is_dir():
            every = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            files = [f for f in every if _format(f)[0] in _FORMATS]
            other = [str(f.relative_to(p)) for f in every if _format(f)[0] not in _FORMATS]
            if other:
                raise PreprocessError(
                    f"input {p}: {len(other)} file(s) of unsupported types in the directory: "
                    f"{', '.join(other[:10])}{' ...' if len(other) > 10 else ''}; expected {'/'.join(_FORMATS)}, "
                    f"optionally followed by {'/'.join(_COMPRESSIONS)} (give the files or a glob pattern instead)")
            if not files:
                raise PreprocessError(f"input {p}: no {'/'.join(_FORMATS)} files in the directory")
            out += files
        elif p.is_file() or (streaming and p.exists()):
            fmt, comp = _format(p)
            if fmt not in _FORMATS and not (streaming and not p.is_file() and not fmt):
                raise PreprocessError(f"input {p}: unsupported file type {''.join(p.suffixes[-2:])!r}; expected one of "
                                      f"{_FORMATS}, optionally followed by {_COMPRESSIONS}")
            out.append(p)
        elif p.exists():
            raise PreprocessError(f"input {p} is not a regular file (a pipe or device needs PreprocessConfig.streaming)")
        else:
            raise PreprocessError(f"input {p} does not exist")
    return out


def _open_binary(path: Path):
    fmt, comp = _format(path)
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".zst":
        try:
            import pyarrow as pa
        except ImportError:
            raise PreprocessError(f"input {path}: reading .zst needs pyarrow (pip install pyarrow)") from None
        return pa.input_stream(str(path), compression="zstd")
    return open(path, "rb")


def _splittable(path: Path, cfg: PreprocessConfig) -> bool:
    fmt, comp = _format(path)
    return not cfg.streaming and not comp and fmt in (".jsonl", ".txt") and path.is_file()


def _align(fh, pos: int, size: int) -> int:
    """The first line start at or after byte ``pos``."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    fh.seek(pos - 1)
    return pos - 1 + len(fh.readline())


def _units(cfg: PreprocessConfig, files: list[Path]) -> list[tuple]:
    """This run's share of the corpus: ``("range", path, start, end)`` for splittable line files,
    ``("whole", path)`` otherwise (parts by global byte offset with ``n_subs``)."""
    n, k = (cfg.n_subs or 1), (cfg.subset_index or 0)
    sizes = [f.stat().st_size if f.is_file() else 0 for f in files]
    total = sum(sizes)
    lo, hi = k * total // n, (k + 1) * total // n
    units, g = [], 0
    for f, size in zip(files, sizes):
        if _splittable(f, cfg):
            a, b = max(lo, g) - g, min(hi, g + size) - g
            if a < b or (n == 1 and size == 0):
                with open(f, "rb") as fh:
                    start, end = _align(fh, a, size), (size if b >= size else _align(fh, b, size))
                if start < end:
                    units.append(("range", f, start, end))
        elif (lo <= g < hi) or (k == n - 1 and g >= hi) or (n == 1):
            units.append(("whole", f))
        g += size
    return units


def _count_lines(path: Path, end: int) -> int:
    n = 0
    with open(path, "rb") as fh:
        left = end
        while left > 0:
            b = fh.read(min(left, 16 << 20))
            if not b:
                break
            n += b.count(b"\n")
            left -= len(b)
    return n


def _iter_json_array(fh, block: int = 1 << 20):
    """Records of a JSON array (or one object) read incrementally: yields ``(k, obj)`` with
    ``k`` from 1, or ``(line, ("error", reason, message))`` and stops."""
    dec = json.JSONDecoder()
    reader = io.TextIOWrapper(fh, encoding="utf-8")
    buf, pos, lines_before, eof = "", 0, 0, False

    def more() -> bool:
        nonlocal buf, pos, lines_before, eof
        if eof:
            return False
        try:
            chunk = reader.read(block)
        except UnicodeDecodeError as e:
            raise _StreamError(lines_before + buf.count("\n") + 1, "invalid_utf8", f"invalid UTF-8 ({e.reason})")
        if not chunk:
            eof = True
            return False
        if pos > block:
            lines_before += buf.count("\n", 0, pos)
            buf, pos = buf[pos:], 0
        buf += chunk
        return True

    def skip_ws() -> bool:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    def line() -> int:
        return lines_before + buf.count("\n", 0, pos) + 1

    try:
        if not skip_ws():
            raise _StreamError(1, "invalid_json", "invalid JSON: empty file")
        if buf[pos] == "{":  # one object
            while more():
                pass
            try:
                obj = json.loads(buf[pos:])
            except json.JSONDecodeError as e:
                raise _StreamError(lines_before + e.lineno, "invalid_json", f"invalid JSON: {e.msg} (column {e.colno})")
            yield 1, obj
            return
        if buf[pos] != "[":
            raise _StreamError(line(), "wrong_type", "expected a JSON array of objects")
        pos += 1
        k = 0
        while True:
            if not skip_ws():
                raise _StreamError(line(), "invalid_json", "invalid JSON: unterminated array")
            if buf[pos] == "]" and k == 0:
                return
            while True:
                try:
                    obj, end = dec.raw_decode(buf, pos)
                    if end == len(buf) and not eof and more():  # a number may continue
                        continue
                    break
                except json.JSONDecodeError as e:
                    if not more():
                        raise _StreamError(lines_before + e.lineno, "invalid_json",
                                           f"invalid JSON: {e.msg} (column {e.colno})")
            k += 1
            pos = end
            yield k, obj
            if not skip_ws():
                raise _StreamError(line(), "invalid_json", "invalid JSON: unterminated array")
            if buf[pos] == ",":
                pos += 1
            elif buf[pos] == "]":
                return
            else:
                raise _StreamError(line(), "invalid_json", f"invalid JSON: expected ',' or ']' at line {line()}")
    except _StreamError as e:
        yield e.line, ("error", e.reason, e.message)


class _StreamError(Exception):
    def __init__(self, line: int, reason: str, message: str):
        super().__init__(message)
        self.line, self.reason, self.message = line, reason, message


def _tasks(cfg: PreprocessConfig, units: list[tuple]) -> Iterator[tuple]:
    """Work items in input order.

    ``("range", file, start, end)``: a worker reads those bytes (lines) itself.
    ``("lines", file, first_line, blob)``: raw lines read by the parent (compressed / streamed).
    ``("objs", file, first_record, [obj or ("error", reason, msg) ...])``: parsed ``.json`` records.
    ``("parquet", file, row_group, first_record)``: a worker reads that row group.
    """
    for unit in units:
        path = unit[1]
        fmt = _format(path)[0] or ".jsonl"
        if unit[0] == "range":
            _, _, start, end = unit
            with open(path, "rb") as fh:
                size = path.stat().st_size
                pos = start
                while pos < end:
                    nxt = min(end, _align(fh, pos + cfg.task_bytes, size))
                    yield ("range", str(path), pos, nxt)
                    pos = nxt
        elif fmt in (".jsonl", ".txt"):
            line = 1
            with _open_binary(path) as fh:
                while True:
                    blob = fh.read(cfg.task_bytes)
                    if not blob:
                        break
                    if not blob.endswith(b"\n"):
                        blob += fh.readline()
                    yield ("lines", str(path), line, blob)
                    line += blob.count(b"\n")
        elif fmt == ".json":
            with _open_binary(path) as fh:
                first, buf = 1, []
                for k, obj in _iter_json_array(fh):
                    if isinstance(obj, tuple) and len(obj) == 3 and obj[0] == "error":
                        if buf:
                            yield ("objs", str(path), first, buf)
                        yield ("objs", str(path), k, [obj])
                        buf = []
                        break
                    buf.append(obj)
                    if len(buf) >= cfg.chunk_size:
                        yield ("objs", str(path), first, buf)
                        first, buf = first + len(buf), []
                if buf:
                    yield ("objs", str(path), first, buf)
        elif fmt == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise PreprocessError(f"input {path}: reading parquet needs pyarrow (pip install pyarrow)") from None
            meta = pq.ParquetFile(path).metadata
            first = 1
            for rg in range(meta.num_row_groups):
                yield ("parquet", str(path), rg, first)
                first += meta.row_group(rg).num_rows


# -- encoding (in the worker) ----------------------------------------------------------------


class _Encoder:
    """Turns work items into results; one per process (holds the tokenizer)."""

    def __init__(self, cfg: PreprocessConfig, tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        self.tok = tokenizer or _load(cfg)
        self.template = get_template(cfg.prompt_type) if cfg.templated else None
        self.style = "sharegpt" if cfg.handler.startswith("Sharegpt") else "alpaca"
        self.bos = {"auto": self.tok.add_bos, "always": True, "never": False}[cfg.bos]
        self.dtype = optimal_dtype(self.tok.vocab_size)
        if self.bos and not self.tok.bos_ids and cfg.bos == "always":
            raise PreprocessError(f"PreprocessConfig.bos: tokenizer {self.tok.path} has no BOS token")
        if cfg.append_eod and self.tok.eos_id is None:
            raise PreprocessError(f"PreprocessConfig.append_eod: tokenizer {self.tok.path} has no EOS token")
        if cfg.handler == "MOSSMultiTurnHandler" and self.tok.family not in ("baichuan", "baichuan2"):
            raise PreprocessError(f"PreprocessConfig.handler: MOSSMultiTurnHandler writes Baichuan's role ids 195 / 196 "
                                  f"(as ModelLink); tokenizer {self.tok.path} is family {self.tok.family!r}, where "
                                  "those ids are other tokens")
        if cfg.handler.startswith("MOSS") and self.tok.eos_id is None:
            raise PreprocessError(f"PreprocessConfig.handler: {cfg.handler} needs an EOS token; "
                                  f"tokenizer {self.tok.path} has none")

    # records -------------------------------------------------------------------------------

    def _lines(self, blob: bytes, kind: str) -> Iterator[tuple[int, Any]]:
        """(relative line, record | RecordError | None for a blank .txt line)."""
        lines = blob.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        try:  # fast path: the whole chunk is valid UTF-8 (per-line errors are found below)
            texts = blob.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            texts = None
        key = self.cfg.json_keys[0]
        loads = json.loads
        for k, raw in enumerate(lines, 1):
            if texts is not None and raw[-1:] not in (b"\r", b"") and not raw[:1].isspace():
                text = texts[k - 1]
                if kind == ".txt":
                    if len(self.cfg.json_keys) == 1:
                        yield k, {key: text}, raw
                        continue
                else:
                    try:
                        yield k, loads(text), raw
                    except json.JSONDecodeError as e:
                        yield k, RecordError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})"), raw
                    continue
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                yield k, (None if kind == ".txt" else RecordError("empty_line", "blank line in a .jsonl file")), raw
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield k, RecordError("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line"), raw
                continue
            if kind == ".txt":
                if len(self.cfg.json_keys) != 1:
                    raise PreprocessError(".txt input gives one text per line: PreprocessConfig.json_keys must "
                                          "hold one key")
                yield k, {self.cfg.json_keys[0]: text}, raw
                continue
            try:
                yield k, json.loads(text), raw
            except json.JSONDecodeError as e:
                yield k, RecordError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})"), raw

    def records(self, task) -> Iterator[tuple[int, Any, bytes]]:
        """(line or record number, record | RecordError | None, raw bytes)."""
        kind = task[0]
        if kind in ("range", "lines"):
            path = task[1]
            if kind == "range":
                with open(path, "rb") as fh:
                    fh.seek(task[2])
                    blob = fh.read(task[3] - task[2])
                base = 0
            else:
                blob, base = task[3], task[2] - 1
            self._newlines = blob.count(b"\n")
            fmt = _format(Path(path))[0] or ".jsonl"
            for k, rec, raw in self._lines(blob, fmt):
                yield base + k, rec, raw
        elif kind == "objs":
            for k, obj in enumerate(task[3]):
                if isinstance(obj, tuple) and len(obj) == 3 and obj[0] == "error":
                    yield task[2] + k, RecordError(obj[1], obj[2]), b""
                else:
                    yield task[2] + k, obj, b""
        elif kind == "parquet":
            import pyarrow.parquet as pq

            rows = pq.ParquetFile(task[1]).read_row_group(task[2]).to_pylist()
            for k, obj in enumerate(rows):
                yield task[3] + k, obj, b""

    # tokenisation --------------------------------------------------------------------------

    def instruction_doc(self, rec) -> tuple[list[tuple[list[int], list[int]]], bool]:
        """One instruction document: ``([(ids, labels), ...], truncated)``."""
        cfg = self.cfg
        if cfg.handler in MODELLINK_INSTRUCTION_HANDLERS:
            seqs = encode_modellink_instruction(cfg.handler, rec, self.tok, bos=self.bos, append_eod=cfg.append_eod)
            if cfg.seq_length is not None:
                longest = max(len(s[0]) for s in seqs) - 1
                if longest > cfg.seq_length:
                    raise RecordError("too_long", f"{longest} training positions > seq_length {cfg.seq_length}")
            return seqs, False
        r = encode_record(rec, self.tok, self.template, style=self.style, map_keys=cfg.map_keys)
        truncated = False
        if cfg.seq_length is not None and len(r.ids) - 1 > cfg.seq_length:
            keep = [e for e in r.turn_ends if e - 1 <= cfg.seq_length]
            if not keep:
                raise RecordError("too_long", f"{len(r.ids) - 1} training positions (first exchange "
                                              f"alone) > seq_length {cfg.seq_length}")
            n = keep[-1]
            r = type(r)(ids=r.ids[:n], labels=r.labels[:n], turn_ends=keep)
            truncated = True
        if len(r.ids) < 2:
            raise RecordError("empty_text", "fewer than 2 tokens after rendering")
        return [(r.ids, r.labels)], truncated

    def run(self, task) -> dict:
        """Encode one work item.

        Returns:
            ``{"keys": {key: (tokens, seq_lengths, seqs_per_doc)}, "rejects": [(line, reason, msg, raw)],
            "records", "written", "tokens", "truncated", "blank", "bytes"}`` (numpy arrays, relative
            line numbers for ``range`` items).
        """
        cfg = self.cfg
        rejects, good = [], []
        records = blank = truncated = 0
        self._newlines = 0
        for line, rec, raw in self.records(task):
            if rec is None:
                blank += 1
                continue
            records += 1
            try:
                if isinstance(rec, RecordError):
                    raise rec
                good.append(pretrain_texts(cfg.handler, rec, cfg.json_keys) if not cfg.instruction
                            else self.instruction_doc(rec))
            except RecordError as e:
                rejects.append((line, e.reason, str(e), bytes(raw[:500]).decode("utf-8", "replace")))
        out: dict[str, tuple] = {}
        tokens = 0
        if not cfg.instruction:
            prefix = list(self.tok.bos_ids) if self.bos else []
            eod = [self.tok.eos_id] if cfg.append_eod else []
            for key in (("text",) if cfg.handler != "GeneralPretrainHandler" else cfg.json_keys):
                out[key] = _wrap(_pack_arrays(self.tok.encode_batch([g[key] for g in good]), None), prefix, eod)
                if key == (cfg.json_keys[0] if cfg.handler == "GeneralPretrainHandler" else "text"):
                    tokens = int(out[key][1].sum())
        else:
            seqs_ids, seqs_lab, per_doc = [], [], []
            for seqs, tr in good:
                truncated += int(tr)
                per_doc.append(len(seqs))
                for ids, labels in seqs:
                    seqs_ids.append(ids)
                    seqs_lab.append(labels)
            ids_a = _pack_arrays(seqs_ids, per_doc)
            lab_a = _pack_arrays(seqs_lab, per_doc)
            out = {"input_ids": ids_a, "labels": lab_a,
                   "attention_mask": (np.ones(len(ids_a[0]), np.int32), ids_a[1], ids_a[2])}
            tokens = int(ids_a[1].sum())
        nbytes = (task[3] - task[2] if task[0] == "range" else len(task[3]) if task[0] == "lines" else 0)
        return {"keys": out, "rejects": rejects, "records": records, "written": len(good), "tokens": tokens,
                "truncated": truncated, "blank": blank, "bytes": nbytes,
                "newlines": self._newlines}


def _pack_arrays(seqs: list[list[int]], per_doc: list[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sequences -> (all tokens int64, lengths int64, sequences per document int64)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    total = int(lengths.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)
    docs = np.ones(len(seqs), np.int64) if per_doc is None else np.asarray(per_doc, np.int64)
    return tokens, lengths, docs


def _wrap(arrays, prefix: list[int], suffix: list[int]):
    """Put ``prefix`` before and ``suffix`` after every sequence of packed arrays (numpy, no
    per-document Python lists)."""
    tokens, lengths, docs = arrays
    extra = len(prefix) + len(suffix)
    if not extra:
        return arrays
    new_lengths = lengths + extra
    ends = np.cumsum(new_lengths)
    starts = ends - new_lengths
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=tokens.dtype)
    body = np.ones(out.size, dtype=bool)
    for j, v in enumerate(prefix):
        out[starts + j] = v
        body[starts + j] = False
    for j, v in enumerate(suffix):
        out[ends - len(suffix) + j] = v
        body[ends - len(suffix) + j] = False
    out[body] = tokens
    return out, new_lengths, docs


def _load(cfg: PreprocessConfig) -> Tokenizer:
    return load_tokenizer(cfg.tokenizer, kind=cfg.tokenizer_kind, use_fast=cfg.use_fast)


# -- worker processes --------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies (no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        os._exit(1)


def _worker(cfg: PreprocessConfig, tok: Tokenizer | None, inq, outq, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        enc = _Encoder(cfg, tok)
    except Exception as e:  # report start-up failures to the parent instead of hanging it
        outq.put((-1, f"worker failed to start: {type(e).__name__}: {e}"))
        return
    while True:
        try:
            job = inq.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if job is None:
            return
        seq, task = job
        try:
            outq.put((seq, enc.run(task)))
        except Exception as e:
            outq.put((-1, f"worker failed on {task[1]}: {type(e).__name__}: {e}"))
            return


def _results(cfg: PreprocessConfig, tasks: Iterator[tuple], tokenizer: Tokenizer) -> Iterator[tuple[tuple, dict]]:
    """(task, result) in input order; in-process for one worker."""
    if cfg.workers == 1:
        enc = _Encoder(cfg, tokenizer)
        for task in tasks:
            yield task, enc.run(task)
        return
    fork = "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else "spawn")
    inq, outq = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, tokenizer if fork else None, inq, outq, os.getpid()),
                         daemon=True, name=f"preprocess-worker-{i}") for i in range(cfg.workers)]
    for p in procs:
        p.start()
    # Results are read by a daemon thread into a local queue: a worker killed in the middle of
    # writing a large result leaves a partial message that would block a reader forever, so the
    # main loop never reads the pipe itself; it polls the local queue and watches the workers.
    local: queue.Queue = queue.Queue()

    def pump():
        while True:
            try:
                local.put(outq.get())
            except (EOFError, OSError, ValueError):  # the queue was closed: the run is over
                return

    threading.Thread(target=pump, daemon=True, name="preprocess-results").start()
    try:
        pending: dict[int, dict] = {}
        sent_tasks: dict[int, tuple] = {}
        sent = next_out = 0
        done = False
        max_inflight = 2 * cfg.workers + 2
        while True:
            while not done and sent - next_out < max_inflight:
                task = next(tasks, None)
                if task is None:
                    done = True
                    break
                inq.put((sent, task))
                sent_tasks[sent] = task
                sent += 1
            if done and next_out == sent:
                break
            try:
                seq, res = local.get(timeout=0.5)
            except queue.Empty:
                seq, res = None, None
            # Workers leave only on the end-of-work sentinel: any exit before it is a death (OOM
            # killer, a signal), which fails the run even if the others could finish the work.
            dead = [p for p in procs if p.exitcode is not None]
            if dead and not (seq is not None and seq < 0):
                p = dead[0]
                how = (f"signal {-p.exitcode} ({signal.Signals(-p.exitcode).name})" if p.exitcode < 0
                       else f"exit code {p.exitcode}")
                raise PreprocessError(f"preprocess worker pid {p.pid} died ({how}); no output was finalised")
            if seq is None:
                continue
            if seq < 0:
                raise PreprocessError(res)
            pending[seq] = res
            while next_out in pending:
                yield sent_tasks.pop(next_out), pending.pop(next_out)
                next_out += 1
    finally:
        for p in procs:
            if p.exitcode is None:
                try:
                    inq.put_nowait(None)
                except Exception:
                    pass
        deadline = time.monotonic() + 3
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join()
        inq.cancel_join_thread()
        outq.cancel_join_thread()
        inq.close()
        outq.close()


# -- driver --------------------------------------------------------------------------------


def preprocess(cfg: PreprocessConfig) -> PreprocessReport:
    """Tokenise the inputs into indexed datasets.

    Args:
        cfg: :class:`PreprocessConfig`.

    Returns:
        :class:`PreprocessReport` (also logged).

    Raises:
        PreprocessError: bad configuration, a dead worker, or the first bad record with ``strict``.
    """
    if cfg.n_subs is not None and cfg.subset_index is None:
        return _preprocess_all_parts(cfg)
    t0 = time.perf_counter()
    files = iter_input_files(cfg.inputs, streaming=cfg.streaming)
    tok = _load(cfg)
    units = _units(cfg, files)
    report = PreprocessReport()
    prefix = cfg.output_prefix
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    report.rejects_path = prefix + "_rejects.jsonl"
    names = output_names(cfg)
    dtype = np.int32 if cfg.instruction else optimal_dtype(tok.vocab_size)
    writers = {k: IndexedDatasetWriter(p, dtype) for k, p in names.items()}
    report.outputs = list(names.values())
    pack_buf: list[tuple[np.ndarray, np.ndarray]] = []
    line_base: dict[str, int] = {}

    def flush_pack():
        lengths = [len(ids) - 1 for ids, _ in pack_buf]
        for b in sorted(greedy_knapsack(lengths, cfg.seq_length), key=min):
            b = sorted(b)
            for k in b:
                ids, labels = pack_buf[k]
                writers["input_ids"].add_sequence(ids)
                writers["labels"].add_sequence(labels)
                writers["attention_mask"].add_sequence(np.ones(len(ids), np.int32))
            for w in writers.values():
                w.end_document()
            report.documents += 1
        pack_buf.clear()

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(unit="doc", desc="preprocess", dynamic_ncols=True, mininterval=0.5)
    ok = False
    next_log = cfg.log_interval
    try:
        with open(report.rejects_path, "w", encoding="utf-8") as rejects:
            for task, res in _results(cfg, _tasks(cfg, units), tok):
                f = task[1]
                if task[0] == "range":
                    if f not in line_base:  # lines before this run's first byte of the file
                        line_base[f] = _count_lines(Path(f), task[2]) if task[2] else 0
                    base = line_base[f]
                    line_base[f] = base + res["newlines"]
                else:
                    base = 0
                for line, reason, msg, raw in res["rejects"]:
                    line += base
                    if cfg.strict:
                        raise PreprocessError(f"{f}:{line}: {reason}: {msg}")
                    report.rejected[reason] += 1
                    if len(report.examples) < 50:
                        report.examples.append(f"{f}:{line}: {reason}: {msg}")
                    rejects.write(json.dumps({"file": f, "line": line, "reason": reason, "message": msg, "raw": raw},
                                             ensure_ascii=False) + "\n")
                report.records += res["records"]
                report.written += res["written"]
                report.tokens += res["tokens"]
                report.truncated += res["truncated"]
                report.blank_lines += res["blank"]
                report.bytes += res["bytes"]
                if cfg.pack:
                    ids, lengths, _ = res["keys"]["input_ids"]
                    labels = res["keys"]["labels"][0]
                    cuts = np.cumsum(lengths)[:-1]
                    for a, b in zip(np.split(ids, cuts), np.split(labels, cuts)):
                        pack_buf.append((a, b))
                        if len(pack_buf) >= cfg.pack_buffer:
                            flush_pack()
                else:
                    for key, (toks, lengths, per_doc) in res["keys"].items():
                        writers[key].add_documents(toks, lengths, per_doc)
                    report.documents += res["written"]
                if bar is not None:
                    bar.update(res["written"])
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{report.bytes / el / 1e6:,.2f} MB/s, {report.tokens / el:,.0f} tok/s, "
                                        f"rejected {report.num_rejected}", refresh=False)
                if cfg.log_interval and report.records >= next_log:
                    el = time.perf_counter() - t0
                    log.info("processed %d records (%.1f docs/s, %.2f MB/s, %.0f tokens/s)", report.records,
                             report.records / el, report.bytes / el / 1e6, report.tokens / el)
                    next_log = (report.records // cfg.log_interval + 1) * cfg.log_interval
            if pack_buf:
                flush_pack()
        for w in writers.values():
            w.finalize()
        ok = True
    finally:
        if bar is not None:
            bar.close()
        if not ok:
            for w in writers.values():
                w.__exit__(RuntimeError, None, None)
    report.seconds = time.perf_counter() - t0
    log.debug("%s", report.summary())
    return report


def _preprocess_all_parts(cfg: PreprocessConfig) -> PreprocessReport:
    """``n_subs`` without ``subset_index``: every part to ``{prefix}_sub{k}of{n}``, then merged."""
    t0 = time.perf_counter()
    n = cfg.n_subs
    total = PreprocessReport()
    parts = []
    for k in range(n):
        part = f"{cfg.output_prefix}_sub{k}of{n}"
        rep = preprocess(replace(cfg, subset_index=k, output_prefix=part))
        parts.append((part, rep))
        for name in ("records", "written", "documents", "tokens", "blank_lines", "truncated", "bytes"):
            setattr(total, name, getattr(total, name) + getattr(rep, name))
        total.rejected.update(rep.rejected)
        total.examples += rep.examples[:50 - len(total.examples)]
    names = output_names(cfg)
    for key, out in names.items():
        part_names = [output_names(cfg, p)[key] for p, _ in parts]
        merge_datasets(part_names, out)
        for p in part_names:
            for suffix in (".bin", ".idx"):
                os.remove(p + suffix)
    total.rejects_path = cfg.output_prefix + "_rejects.jsonl"
    with open(total.rejects_path, "wb") as out:
        for p, rep in parts:
            with open(rep.rejects_path, "rb") as f:
                shutil.copyfileobj(f, out)
            os.remove(rep.rejects_path)
    total.outputs = list(names.values())
    total.seconds = time.perf_counter() - t0
    return total


def merge_datasets(prefixes, output_prefix: str | Path) -> None:
    """Concatenate ``.bin/.idx`` datasets in order into ``output_prefix`` (megatron-core's
    ``IndexedDatasetBuilder.add_index``): the bytes equal one run over the concatenated inputs.

    Args:
        prefixes: dataset prefixes, in corpus order (all of one dtype).
        output_prefix: the merged dataset's prefix.
    """
    prefixes = [str(p) for p in prefixes]
    if not prefixes:
        raise PreprocessError("merge_datasets: no datasets to merge")
    dtypes = {str(p): IndexedDataset(p).dtype for p in prefixes}
    if len(set(dtypes.values())) != 1:
        raise PreprocessError(f"merge_datasets: the datasets have different dtypes: {dtypes}")
    with IndexedDatasetWriter(output_prefix, next(iter(dtypes.values()))) as w:
        for p in prefixes:
            w.add_index(p)
