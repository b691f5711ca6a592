"""`reformer-dist prepare-data`: the real stdlib corpus, --verify, and user errors without tracebacks."""

from __future__ import annotations

import json
import re

import pytest

from reformer_dist.cli import main
from reformer_dist.data.sources import stdlib_files


def counts(text: str, label: str) -> list[int]:
    """The comma-grouped integers on the output line starting with `label`."""
    line = next(x for x in text.splitlines() if x.strip().startswith(label))
    return [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", line.split(label, 1)[1])]


def test_prepare_stdlib_writes_shards_and_prints_counts(tmp_path, capsys):
    out = tmp_path / "stdlib"
    assert main(["prepare-data", "--input", "stdlib", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())

    files = stdlib_files()
    assert len(files) > 100 and all(f.endswith(".py") and "site-packages" not in f for f in files)
    n_files, n_bytes = counts(printed, "source")
    assert n_files == len(files) and n_bytes == manifest["sources"][0]["bytes"] > 1_000_000
    train, val = counts(printed, "train")[0], counts(printed, "val")[0]
    assert train + val == n_bytes  # bytes tokenizer: one token per byte
    assert val == round(n_bytes * 0.005)
    assert str(out) in printed
    assert manifest["sources"][0]["input"] == "stdlib" and manifest["dtype"] == "uint8"


def test_verify_reports_a_corrupted_shard_without_a_traceback(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n" * 500)
    assert main(["prepare-data", "-i", str(tmp_path / "a.txt"), "-o", str(tmp_path / "d")]) == 0
    assert main(["prepare-data", "--verify", str(tmp_path / "d")]) == 0
    assert "all shards match" in capsys.readouterr().out

    shard = tmp_path / "d" / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert main(["prepare-data", "--verify", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "train-00000.bin: sha256 does not match" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--input", "/nonexistent/corpus.txt", "--output", "OUT"], "input not found: /nonexistent/corpus.txt"),
    (["--output", "OUT"], "needs --input"),
    (["--input", "stdlib", "--output", "OUT", "--tokenizer", "nope.model"], "neither 'bytes' nor an existing"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(["prepare-data", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
