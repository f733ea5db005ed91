"""preprocess_data at corpus scale: byte-range workers, partitions + merge, streamed and
compressed inputs, megatron-core's reader and writer, dead workers and killed parents."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pmodel.data import IndexedDataset, PreprocessConfig, PreprocessError, load_tokenizer, preprocess
from pmodel.data.preprocess import merge_datasets
from tests._data_helpers import shared_data

ROOT = Path(__file__).resolve().parents[1]


def _corpus(path: Path, n: int = 3000) -> None:
    rows = []
    for i in range(n):
        if i % 97 == 5:
            rows.append('{"text": "broken')                          # invalid_json
        elif i % 89 == 7:
            rows.append("")                                            # empty_line
        else:
            rows.append(json.dumps({"text": f"doc {i} héllo 你好 " * (1 + i % 13), "id": i}, ensure_ascii=False))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def _cfg(prefix, inputs, **kw):
    kw.setdefault("tokenizer", "bytes")
    return PreprocessConfig(inputs=tuple(str(i) for i in inputs), output_prefix=str(prefix), progress=False,
                            log_interval=0, **kw)


def _bytes(prefix) -> tuple[bytes, bytes]:
    return Path(str(prefix) + ".bin").read_bytes(), Path(str(prefix) + ".idx").read_bytes()


def _megatron_written(prefix: Path, docs, dtype) -> tuple[bytes, bytes]:
    """The same documents through megatron-core's own IndexedDatasetBuilder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.dtype(dtype).type)
    for d in docs:
        b.add_item(torch.tensor(np.asarray(d, dtype=np.int64)))
        b.end_document()
    b.finalize(str(prefix) + ".idx")
    return _bytes(prefix)


def test_workers_task_sizes_and_megatron_writer_agree(tmp_path):
    src = tmp_path / "c.jsonl"
    _corpus(src)
    one = preprocess(_cfg(tmp_path / "one", [src], workers=1))
    two = preprocess(_cfg(tmp_path / "two", [src], workers=2, task_bytes=4096))
    three = preprocess(_cfg(tmp_path / "three", [src], workers=3, task_bytes=777))
    assert one.records == two.records == three.records == 3000
    assert one.num_rejected == two.num_rejected == three.num_rejected > 0
    ref = _bytes(tmp_path / "one_text_document")
    assert _bytes(tmp_path / "two_text_document") == ref == _bytes(tmp_path / "three_text_document")
    # rejects are located identically however the file was cut
    assert Path(one.rejects_path).read_text() == Path(two.rejects_path).read_text() == \
        Path(three.rejects_path).read_text()
    lines = [json.loads(l)["line"] for l in Path(one.rejects_path).read_text().splitlines()]
    assert lines[:2] == [6, 8] and lines == sorted(lines)
    # megatron-core's writer, fed the documents one by one, writes the same bytes
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    ds = IndexedDataset(tmp_path / "one_text_document")
    assert _megatron_written(tmp_path / "m", [ds[i] for i in range(len(ds))], ds.dtype) == ref


@pytest.mark.parametrize("n", [4, 3])
def test_partitions_and_merge_equal_one_run(tmp_path, n):
    src = tmp_path / "c.jsonl"
    _corpus(src, 1200)
    (tmp_path / "t.txt").write_text("a line\n\nanother line\n" * 50, encoding="utf-8")
    inputs = [src, tmp_path / "t.txt"]
    whole = preprocess(_cfg(tmp_path / "whole", inputs))
    parts = [preprocess(_cfg(tmp_path / f"part{k}", inputs, n_subs=n, subset_index=k, workers=1 + k % 2,
                             task_bytes=3000)) for k in range(n)]
    assert sum(p.records for p in parts) == whole.records and sum(p.blank_lines for p in parts) == whole.blank_lines
    assert all(p.written > 0 for p in parts)
    merge_datasets([tmp_path / f"part{k}_text_document" for k in range(n)], tmp_path / "merged")
    assert _bytes(tmp_path / "merged") == _bytes(tmp_path / "whole_text_document")
    # reject lines stay absolute in every part
    got = [l for k in range(n) for l in Path(parts[k].rejects_path).read_text().splitlines()]
    assert got == Path(whole.rejects_path).read_text().splitlines()
    # the script, as ModelLink's --n-subs: parts written and merged in one run
    rep = preprocess(_cfg(tmp_path / "nsubs", inputs, n_subs=n, workers=2))
    assert _bytes(tmp_path / "nsubs_text_document") == _bytes(tmp_path / "whole_text_document")
    assert rep.records == whole.records and not list(tmp_path.glob("nsubs_sub*"))
    # megatron-core's reader reads the merged file
    pytest.importorskip("megatron.core", reason="megatron-core not installed")
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed

    m, ours = MIndexed(str(tmp_path / "merged")), IndexedDataset(tmp_path / "whole_text_document")
    assert len(m) == len(ours) and all(np.array_equal(m[i], ours[i]) for i in range(0, len(ours), 37))
    np.testing.assert_array_equal(m.document_indices, ours.document_indices)


def test_merge_script(tmp_path):
    src = tmp_path / "c.jsonl"
    _corpus(src, 300)
    preprocess(_cfg(tmp_path / "whole", [src]))
    for k in range(2):
        preprocess(_cfg(tmp_path / "p" / f"part{k}", [src], n_subs=2, subset_index=k))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_datasets.py"), "--input",
                          str(tmp_path / "p" / "part0_text_document"), str(tmp_path / "p" / "part1_text_document.idx"),
                          "--output-prefix", str(tmp_path / "m")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert _bytes(tmp_path / "m") == _bytes(tmp_path / "whole_text_document")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_datasets.py"), "--input",
                          str(tmp_path / "nope"), "--output-prefix", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 1 and "does not exist" in bad.stderr


def test_streamed_compressed_and_glob_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    recs = [{"text": f"record {i} " * (i % 5 + 1)} for i in range(400)]
    recs[10] = {"text": ""}
    d = tmp_path / "in"
    d.mkdir()
    plain = d / "a.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    base = preprocess(_cfg(tmp_path / "base", [plain]))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(plain.read_text(encoding="utf-8"))
    with pa.output_stream(str(tmp_path / "a.jsonl.zst"), compression="zstd") as f:
        f.write(plain.read_bytes())
    (tmp_path / "a.json").write_text(json.dumps(recs, indent=1), encoding="utf-8")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet", row_group_size=64)
    for name, kw in (("a.jsonl.gz", {}), ("a.jsonl.zst", {"workers": 2}), ("a.json", {"chunk_size": 7}),
                     ("a.parquet", {"workers": 2}), ("in/*.jsonl", {"streaming": True, "task_bytes": 999})):
        rep = preprocess(_cfg(tmp_path / name.replace("/", "_").replace("*", "x"), [tmp_path / name], **kw))
        assert rep.written == 399 and dict(rep.rejected) == {"empty_text": 1}, name
        assert rep.examples[0].endswith("11: empty_text: key 'text': empty text"), (name, rep.examples)
        out = str(tmp_path / name.replace("/", "_").replace("*", "x")) + "_text_document"
        assert _bytes(out) == _bytes(tmp_path / "base_text_document"), name


def test_streaming_reads_a_pipe(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    payload = "".join(json.dumps({"text": f"piped {i}"}) + "\n" for i in range(50)).encode()
    writer = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'wb').write({payload!r})"])
    rep = preprocess(_cfg(tmp_path / "p", [fifo], streaming=True, workers=2))
    writer.wait(timeout=30)
    assert rep.written == 50
    with pytest.raises(PreprocessError, match="not a regular file .*streaming"):
        preprocess(_cfg(tmp_path / "q", [fifo]))


def test_json_array_streaming_errors(tmp_path):
    (tmp_path / "bad.json").write_text('[{"text": "ok"},\n {"text": "two"},\n {"text": oops}]', encoding="utf-8")
    (tmp_path / "obj.json").write_text('{"text": "single object"}', encoding="utf-8")
    (tmp_path / "num.json").write_text('42', encoding="utf-8")
    rep = preprocess(_cfg(tmp_path / "o", [tmp_path / "bad.json", tmp_path / "obj.json", tmp_path / "num.json"]))
    assert rep.written == 3 and dict(rep.rejected) == {"invalid_json": 1, "wrong_type": 1}
    assert any("bad.json:3: invalid_json" in e for e in rep.examples)


def test_pretraining_bos_as_the_hf_tokenizer_call(tmp_path):
    data = shared_data()
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "Hello world"}\n', encoding="utf-8")
    for tok, bos, want in (("llama2", "auto", [1, 15043, 3186]), ("llama2", "never", [15043, 3186]),
                           ("qwen", "auto", [9707, 1879]), ("qwen", "always", None),
                           ("llama3/tokenizer.model", "auto", [128000, 9906, 1917])):
        cfg = _cfg(tmp_path / f"{tok.replace('/', '_')}_{bos}", [src], tokenizer=str(data / "tokenizers" / tok),
                   bos=bos, append_eod=True)
        if want is None:
            with pytest.raises(PreprocessError, match="has no BOS token"):
                preprocess(cfg)
            continue
        preprocess(cfg)
        ds = IndexedDataset(cfg.output_prefix + "_text_document")
        eos = load_tokenizer(data / "tokenizers" / tok).eos_id
        assert ds[0].tolist() == want + [eos], (tok, bos)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _big(path: Path) -> None:
    line = json.dumps({"text": "lorem ipsum dolor sit amet " * 40}) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(20):
            f.write(line * 2000)


def _start(tmp_path, src) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "preprocess_data.py"), "--input", str(src),
                             "--tokenizer-type", "ByteTokenizer", "--output-prefix", str(tmp_path / "o"),
                             "--workers", "2", "--task-bytes", "65536", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_children(proc, n=2, timeout=60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _children(proc.pid)
        if len(kids) >= n:
            return kids
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"workers did not start: {proc.communicate()}")


@pytest.mark.slow
def test_dead_worker_fails_the_run(tmp_path):
    src = tmp_path / "big.jsonl"
    _big(src)
    proc = _start(tmp_path, src)
    kids = _wait_children(proc)
    os.kill(kids[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"worker pid {kids[0]} died (signal 9 (SIGKILL))" in err, err
    assert not any(_alive(k) for k in kids)
    assert not Path(str(tmp_path / "o") + "_text_document.idx").exists()


@pytest.mark.slow
def test_killed_parent_leaves_no_workers(tmp_path):
    src = tmp_path / "big.jsonl"
    _big(src)
    proc = _start(tmp_path, src)
    kids = _wait_children(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(k) for k in kids):
        time.sleep(0.1)
    assert not any(_alive(k) for k in kids), [k for k in kids if _alive(k)]
