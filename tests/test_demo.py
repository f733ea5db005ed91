"""scripts/demo.py end to end at toy size (the full run is `make demo`)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _demo():
    spec = importlib.util.spec_from_file_location("demo_script", ROOT / "scripts" / "demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SMALL = ["--iters", "3", "--batch-size", "2", "--seq-length", "32", "--no-progress"]


def test_demo_on_stdlib_source(tmp_path, capsys):
    assert _demo().main(["--out", str(tmp_path), "--max-chars", "300000", "--vocab-size", "400", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "trained a SentencePiece BPE tokenizer, vocab 400" in out
    assert "(identical to the live model)" in out and "sample (temperature" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("demo: 3 iters") and "checkpoint reloaded OK" in last
    assert (tmp_path / "tokenizer.model").exists() and (tmp_path / "checkpoint" / "latest").exists()


def test_demo_on_user_text_file(tmp_path, capsys):
    f = tmp_path / "story.txt"
    f.write_text("\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}." for i in range(3000)))
    g = tmp_path / "held.txt"
    g.write_text("\n".join(f"Held {i}: a lazy dog sleeps under the brown tree {i % 5}." for i in range(400)))
    assert _demo().main(["--out", str(tmp_path / "o"), "--text-file", str(f), str(g), "--vocab-size", "400", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "[2 files cut into" in out and "held-out loss" in out


@pytest.mark.skipif(not (SHARED / "models" / "stories260K").exists(), reason="needs ../shared/data (stories260K)")
def test_demo_from_hf_checkpoint(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("Once upon a time there was a little girl. She liked to play in the park with her dog.\n" * 300)
    g = tmp_path / "u.txt"
    g.write_text("One day the dog ran away and the girl was sad. Then the dog came back.\n" * 60)
    rc = _demo().main(["--out", str(tmp_path / "o"), "--text-file", str(f), str(g),
                       "--hf-model", str(SHARED / "models" / "stories260K"), *SMALL])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tokenizer and weights from" in out and "checkpoint reloaded OK" in out


@pytest.mark.parametrize("extra, msg", [
    (["--hf-model", "m", "--vocab-size", "500"], "--hf-model brings its own tokenizer"),
    (["--lr", "0"], "--lr must be > 0"),          # `args.lr or default` would have used 3e-3
    (["--iters", "0"], "--iters must be >= 1"),
    (["--text-file", "a.txt", "--glob", "*.md"], "--glob applies to a folder"),
])
def test_demo_refuses_flags_it_would_ignore(tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit):
        _demo().main(["--out", str(tmp_path / "o"), *extra])
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any work
