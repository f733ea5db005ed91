"""Raw text / JSON -> tokenised ``MMIDIDX`` datasets (the engine behind
``scripts/preprocess_data.py``, with ModelLink's handlers and output names).

Inputs: ``.jsonl`` (one JSON object per line), ``.json`` (an array of objects), ``.txt``
(one document per line; blank lines are skipped and counted), ``.parquet`` (when pyarrow is
installed). A directory is expanded to its files of those kinds, sorted by name.

Handlers:

* ``GeneralPretrainHandler``: each key of ``json_keys`` is tokenised into
  ``{prefix}_{key}_document.bin/.idx`` (plus EOD with ``append_eod``);
* ``AlpacaStyleInstructionHandler`` / ``SharegptStyleInstructionHandler``: records are
  rendered with the chat template ``prompt_type`` into ``{prefix}_packed_input_ids_document``,
  ``{prefix}_packed_labels_document`` (-100 on prompts) and
  ``{prefix}_packed_attention_mask_document`` (as ModelLink writes them). With ``pack`` each
  document holds several samples (one sequence each), grouped by greedy knapsack up to
  ``seq_length`` training positions.

Bad records (invalid JSON or UTF-8, missing keys, wrong types, empty text, over-long
samples) are counted by reason, reported with file and line, and written to
``{prefix}_rejects.jsonl``; nothing is dropped silently. ``strict`` makes the first one fatal.
Work runs in ``workers`` processes on chunks of records; output order equals input order.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from .indexed import IndexedDatasetWriter, optimal_dtype
from .instruction import RecordError, encode_record, greedy_knapsack
from .templates import get_template
from .tokenizers import Tokenizer, load_tokenizer

__all__ = ["HANDLERS", "PreprocessConfig", "PreprocessReport", "PreprocessError", "preprocess",
           "iter_input_files"]

log = logging.getLogger("pmodel.data.preprocess")

HANDLERS = ("GeneralPretrainHandler", "AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler")
_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


class PreprocessError(ValueError):
    """A fatal bad record (``strict``) or bad configuration."""


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """Everything ``preprocess`` needs (the script maps flags onto this).

    Args:
        inputs: files or directories.
        output_prefix: output path prefix.
        tokenizer: tokenizer file or folder (``"bytes"`` for the byte tokenizer).
        tokenizer_kind: see :func:`pmodel.data.load_tokenizer`.
        json_keys: keys to tokenise (pretraining).
        handler: one of :data:`HANDLERS`.
        prompt_type: chat template name (instruction handlers only).
        map_keys: field renames (instruction handlers only).
        append_eod: append EOS to each pretraining document (GeneralPretrainHandler only).
        seq_length: instruction samples with more than ``seq_length`` training positions
            (ids - 1) lose their later turns, or are dropped and counted when even the first
            exchange is too long. Required with ``pack``; refused for GeneralPretrainHandler
            (pretraining samples are cut at training time).
        pack: pack instruction samples (greedy knapsack) up to ``seq_length``.
        pack_buffer: samples considered together by one knapsack.
        workers: worker processes (1 = in-process).
        chunk_size: records per work item.
        strict: stop at the first bad record.
        log_interval: log a progress line every this many records (0: never).
        progress: show a tqdm bar.
    """

    inputs: tuple[str, ...]
    output_prefix: str
    tokenizer: str
    tokenizer_kind: str = "auto"
    json_keys: tuple[str, ...] = ("text",)
    handler: str = "GeneralPretrainHandler"
    prompt_type: str | None = None
    map_keys: Mapping[str, str] = field(default_factory=dict)
    append_eod: bool = False
    seq_length: int | None = None
    pack: bool = False
    pack_buffer: int = 4096
    workers: int = 1
    chunk_size: int = 256
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
        for name in ("workers", "chunk_size"):
            if getattr(self, name) < 1:
                raise PreprocessError(f"PreprocessConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_length is not None and self.seq_length < 1:
            raise PreprocessError(f"PreprocessConfig.seq_length must be >= 1, got {self.seq_length}")
        if self.pack and (self.seq_length is None or self.handler == "GeneralPretrainHandler"):
            raise PreprocessError("PreprocessConfig.pack needs PreprocessConfig.seq_length and an instruction "
                                  "handler in PreprocessConfig.handler")
        if not self.json_keys:
            raise PreprocessError("PreprocessConfig.json_keys is empty")
        if self.handler != "GeneralPretrainHandler":
            get_template(self.prompt_type)  # validate early
            if self.append_eod:
                # the chat template already ends every response with its own end token
                raise PreprocessError(f"PreprocessConfig.append_eod applies to GeneralPretrainHandler; "
                                      f"{self.handler} ends each response with the PreprocessConfig.prompt_type "
                                      "template's end token instead")
        else:
            # Pretraining documents are concatenated and cut into seq-length samples at training
            # time (PretrainConfig.seq_length, as Megatron's GPTDataset), so a long document is
            # normal data, not an error; ModelLink's GeneralPretrainHandler ignores the flag too.
            given = [f"PreprocessConfig.{f}" for f, v in (("seq_length", self.seq_length),
                                                          ("prompt_type", self.prompt_type),
                                                          ("map_keys", self.map_keys or None)) if v is not None]
            if given:
                raise PreprocessError(
                    f"{', '.join(given)} apply to the instruction handlers only; GeneralPretrainHandler "
                    "tokenises whole documents (samples are cut to the sequence length when the pretraining "
                    "dataset is built)")

    @property
    def instruction(self) -> bool:
        return self.handler != "GeneralPretrainHandler"


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
            f"time: {self.seconds:.2f}s ({self.records / s:.1f} docs/s, {self.tokens / s:.0f} tokens/s)",
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


# -- reading -------------------------------------------------------------------------------


def iter_input_files(inputs) -> list[Path]:
    """Expand files / directories into the input files (sorted within a directory).

    Args:
        inputs: paths.

    Returns:
        Files to read.
    """
    out = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _SUFFIXES)
            if not files:
                raise PreprocessError(f"input {p}: no {'/'.join(_SUFFIXES)} files in the directory")
            out += files
        elif p.is_file():
            if p.suffix not in _SUFFIXES:
                raise PreprocessError(f"input {p}: unsupported file type {p.suffix!r}; expected one of {_SUFFIXES}")
            out.append(p)
        else:
            raise PreprocessError(f"input {p} does not exist")
    return out


# A work item: (file, line, kind, payload); kind "jsonl" (raw bytes), "txt" (raw bytes),
# "obj" (a parsed object), "error" (reason, message, raw).


def _iter_items(path: Path, report: PreprocessReport) -> Iterator[tuple]:
    f = str(path)
    if path.suffix in (".jsonl", ".txt"):
        kind = path.suffix[1:]
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                raw = raw.rstrip(b"\r\n")
                if kind == "txt" and not raw.strip():
                    report.blank_lines += 1
                    continue
                if kind == "jsonl" and not raw.strip():
                    yield (f, lineno, "error", ("empty_line", "blank line in a .jsonl file", ""))
                    continue
                yield (f, lineno, kind, raw)
    elif path.suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            yield (f, line, "error", ("invalid_utf8", f"invalid UTF-8 at byte {e.start}", ""))
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            yield (f, e.lineno, "error", ("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})", ""))
            return
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            yield (f, 1, "error", ("wrong_type", f"expected a JSON array of objects, got {type(data).__name__}", ""))
            return
        for k, rec in enumerate(data, 1):  # "line" is the record number for .json arrays
            yield (f, k, "obj", rec)
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PreprocessError(f"input {path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        for k, rec in enumerate(table.to_pylist(), 1):
            yield (f, k, "obj", rec)


# -- workers -------------------------------------------------------------------------------


class _Encoder:
    """Turns work items into results; one per process (holds the tokenizer)."""

    def __init__(self, cfg: PreprocessConfig, tokenizer: Tokenizer | None = None):
        self.cfg = cfg
        self.tok = tokenizer or load_tokenizer(cfg.tokenizer, kind=cfg.tokenizer_kind)
        self.template = get_template(cfg.prompt_type) if cfg.instruction else None
        self.style = "sharegpt" if cfg.handler.startswith("Sharegpt") else "alpaca"
        if cfg.append_eod and self.tok.eos_id is None:
            raise PreprocessError(f"PreprocessConfig.append_eod: tokenizer {self.tok.path} has no EOS token")

    def record(self, kind: str, payload) -> Any:
        if kind == "error":
            raise RecordError(payload[0], payload[1])
        if kind == "txt":
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line") from None
            if len(self.cfg.json_keys) != 1:
                raise PreprocessError(".txt input gives one text per line: PreprocessConfig.json_keys must "
                                      "hold one key")
            return {self.cfg.json_keys[0]: text}
        if kind == "jsonl":
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line") from None
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise RecordError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})") from None
        return payload

    def encode(self, kind: str, payload):
        """Parse, check and tokenise one record."""
        rec = self.record(kind, payload)
        if not self.cfg.instruction:
            _, texts = self.validate("obj", rec)
            return ("pretrain", {k: self.tok.encode(v, eos=self.cfg.append_eod) for k, v in texts.items()})
        r = encode_record(rec, self.tok, self.template, style=self.style, map_keys=self.cfg.map_keys)
        truncated = False
        if self.cfg.seq_length is not None and len(r.ids) - 1 > self.cfg.seq_length:
            keep = [e for e in r.turn_ends if e - 1 <= self.cfg.seq_length]
            if not keep:
                raise RecordError("too_long", f"{len(r.ids) - 1} training positions (first exchange "
                                              f"alone) > seq_length {self.cfg.seq_length}")
            n = keep[-1]
            r = type(r)(ids=r.ids[:n], labels=r.labels[:n], turn_ends=keep)
            truncated = True
        if len(r.ids) < 2:
            raise RecordError("empty_text", "fewer than 2 tokens after rendering")
        return ("instruction", (r.ids, r.labels, truncated))

    def chunk(self, items: list[tuple]) -> list[tuple]:
        out = []
        batch = hasattr(self.tok, "encode_batch") and not self.cfg.instruction
        for f, line, kind, payload in items:
            try:
                out.append((f, line, True, self.validate(kind, payload) if batch else self.encode(kind, payload)))
            except RecordError as e:
                raw = payload if isinstance(payload, (bytes, bytearray)) else b""
                out.append((f, line, False, (e.reason, str(e), raw[:500].decode("utf-8", "replace"))))
        if batch:  # one batched call per key for the whole chunk (HF tokenizers)
            good = [k for k, r in enumerate(out) if r[2]]
            eod = [self.tok.eos_id] if self.cfg.append_eod else []
            for key in self.cfg.json_keys:
                ids = self.tok.encode_batch([out[k][3][1][key] for k in good])
                for k, x in zip(good, ids):
                    out[k][3][1][key] = x + eod
        # numpy arrays pickle far faster than lists of ints on the way back from workers
        for r in out:
            if r[2]:
                kind, data = r[3]
                if kind == "pretrain":
                    for key in data:
                        data[key] = np.asarray(data[key], dtype=np.int64)
        return out

    def validate(self, kind: str, payload):
        """Parse and check a pretraining record; texts are encoded later in a batch."""
        rec = self.record(kind, payload)
        if not isinstance(rec, dict):
            raise RecordError("wrong_type", f"expected a JSON object, got {type(rec).__name__}")
        out = {}
        for key in self.cfg.json_keys:
            if key not in rec:
                raise RecordError("missing_key", f"missing key {key!r} (expected a string)")
            v = rec[key]
            if not isinstance(v, str):
                raise RecordError("wrong_type", f"key {key!r}: expected a string, got {type(v).__name__}")
            if not v.strip():
                raise RecordError("empty_text", f"key {key!r}: empty text")
            out[key] = v
        return ("pretrain", out)


def _worker(cfg: PreprocessConfig, inq, outq) -> None:
    try:
        enc = _Encoder(cfg)
    except Exception as e:  # report start-up failures to the parent instead of hanging it
        outq.put((-1, f"worker failed to start: {type(e).__name__}: {e}"))
        return
    while True:
        job = inq.get()
        if job is None:
            return
        seq, items = job
        try:
            outq.put((seq, enc.chunk(items)))
        except Exception as e:
            outq.put((-1, f"worker failed on {items[0][0]}:{items[0][1]}: {type(e).__name__}: {e}"))
            return


def _chunks(cfg: PreprocessConfig, files: list[Path], report: PreprocessReport) -> Iterator[list[tuple]]:
    buf = []
    for path in files:
        for item in _iter_items(path, report):
            buf.append(item)
            if len(buf) >= cfg.chunk_size:
                yield buf
                buf = []
    if buf:
        yield buf


def _results(cfg: PreprocessConfig, files, report, tokenizer) -> Iterator[list[tuple]]:
    """Encoded chunks in input order (in-process for one worker)."""
    if cfg.workers == 1:
        enc = _Encoder(cfg, tokenizer)
        for items in _chunks(cfg, files, report):
            yield enc.chunk(items)
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    inq, outq = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cfg, inq, outq), daemon=True) for _ in range(cfg.workers)]
    for p in procs:
        p.start()
    try:
        pending: dict[int, list] = {}
        sent = received = next_out = 0
        source = _chunks(cfg, files, report)
        done = False
        max_inflight = 4 * cfg.workers
        while True:
            while not done and sent - received < max_inflight:
                items = next(source, None)
                if items is None:
                    done = True
                    break
                inq.put((sent, items))
                sent += 1
            if done and received == sent:
                break
            seq, res = outq.get()
            if seq < 0:
                raise PreprocessError(res)
            received += 1
            pending[seq] = res
            while next_out in pending:
                yield pending.pop(next_out)
                next_out += 1
        while next_out in pending:
            yield pending.pop(next_out)
            next_out += 1
    finally:
        for _ in procs:
            inq.put(None)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


# -- driver --------------------------------------------------------------------------------


def preprocess(cfg: PreprocessConfig) -> PreprocessReport:
    """Tokenise the inputs into indexed datasets.

    Args:
        cfg: :class:`PreprocessConfig`.

    Returns:
        :class:`PreprocessReport` (also logged).

    Raises:
        PreprocessError: bad configuration, or the first bad record with ``strict``.
    """
    t0 = time.perf_counter()
    files = iter_input_files(cfg.inputs)
    tok = load_tokenizer(cfg.tokenizer, kind=cfg.tokenizer_kind)
    report = PreprocessReport()
    prefix = cfg.output_prefix
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    report.rejects_path = prefix + "_rejects.jsonl"
    if cfg.instruction:
        names = {k: f"{prefix}_packed_{k}_document" for k in ("input_ids", "attention_mask", "labels")}
        writers = {k: IndexedDatasetWriter(p, np.int32) for k, p in names.items()}
    else:
        names = {k: f"{prefix}_{k}_document" for k in cfg.json_keys}
        writers = {k: IndexedDatasetWriter(p, optimal_dtype(tok.vocab_size)) for k, p in names.items()}
    report.outputs = list(names.values())
    pack_buf: list[tuple[list[int], list[int]]] = []

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
    try:
        with open(report.rejects_path, "w", encoding="utf-8") as rejects:
            for res in _results(cfg, files, report, tok):
                for f, line, good, payload in res:
                    report.records += 1
                    if not good:
                        reason, msg, raw = payload
                        if cfg.strict:
                            raise PreprocessError(f"{f}:{line}: {reason}: {msg}")
                        report.rejected[reason] += 1
                        if len(report.examples) < 50:
                            report.examples.append(f"{f}:{line}: {reason}: {msg}")
                        rejects.write(json.dumps({"file": f, "line": line, "reason": reason,
                                                  "message": msg, "raw": raw}, ensure_ascii=False) + "\n")
                        continue
                    kind, data = payload
                    report.written += 1
                    if kind == "pretrain":
                        for key, ids in data.items():
                            writers[key].add_document(ids)
                        report.tokens += len(data[cfg.json_keys[0]])
                        report.documents += 1
                    else:
                        ids, labels, truncated = data
                        report.truncated += int(truncated)
                        report.tokens += len(ids)
                        if cfg.pack:
                            pack_buf.append((ids, labels))
                            if len(pack_buf) >= cfg.pack_buffer:
                                flush_pack()
                        else:
                            writers["input_ids"].add_document(ids)
                            writers["labels"].add_document(labels)
                            writers["attention_mask"].add_document(np.ones(len(ids), np.int32))
                            report.documents += 1
                    if cfg.log_interval and report.records % cfg.log_interval == 0:
                        el = time.perf_counter() - t0
                        log.info("processed %d records (%.1f docs/s, %.0f tokens/s)",
                                 report.records, report.records / el, report.tokens / el)
                if bar is not None:
                    bar.update(len(res))
                    el = max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{report.tokens / el:,.0f} tok/s, rejected {report.num_rejected}",
                                        refresh=False)
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
