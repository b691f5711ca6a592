"""prepare_corpus: inputs, splits (tail and enwik8), shards, determinism, atomic rewrites, input errors."""

from __future__ import annotations

import gzip
import json
import os
import zipfile

import numpy as np
import pytest

from reformer_dist.data import TokenWindowDataset, load_manifest, prepare_corpus
from reformer_dist.data.tokenizer import ByteTokenizer
from reformer_dist.errors import DataError


def split_bytes(data_dir, split: str) -> bytes:
    """The split's token stream as bytes (bytes tokenizer, offset 0)."""
    ds = TokenWindowDataset(str(data_dir), split, seq_len=1)
    return ds.tokens(0, ds.n_tokens).astype(np.uint8).tobytes()


def test_enwik8_split_sizes_on_a_scaled_down_file(tmp_path):
    # the real split logic, sizes scaled 1:10^4 (90M/5M/5M -> 9000/500/500 bytes)
    sizes = (("train", 9000), ("val", 500), ("test", 500))
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    (tmp_path / "enwik8").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("enwik8", data)

    for name in ("enwik8", "enwik8.zip"):
        out = tmp_path / f"out-{name}"
        manifest = prepare_corpus([str(tmp_path / name)], str(out), byte_offset=2, enwik8_splits=sizes,
                                  block_bytes=333, progress=False)
        assert {k: v["n_tokens"] for k, v in manifest["splits"].items()} == {"train": 9000, "val": 500, "test": 500}
        assert manifest["vocab_size"] == 258 and manifest["dtype"] == "uint16"
        assert manifest["split_rule"]["kind"] == "enwik8"
        for split, lo, hi in (("train", 0, 9000), ("val", 9000, 9500), ("test", 9500, 10_000)):
            ds = TokenWindowDataset(str(out), split, seq_len=1)
            assert (ds.tokens(0, ds.n_tokens) - 2).astype(np.uint8).tobytes() == data[lo:hi]


def test_enwik8_of_the_wrong_size_is_rejected(tmp_path):
    (tmp_path / "enwik8").write_bytes(b"x" * 999)
    with pytest.raises(DataError, match="enwik8 must be exactly 1,000 bytes"):
        prepare_corpus([str(tmp_path / "enwik8")], str(tmp_path / "out"),
                       enwik8_splits=(("train", 900), ("val", 50), ("test", 50)))


def test_val_split_is_the_exact_tail_of_the_stream_across_shards(tmp_path):
    text = b"".join(b"line %05d of the corpus\n" % i for i in range(2000))
    (tmp_path / "a.txt").write_bytes(text)
    manifest = prepare_corpus([str(tmp_path / "a.txt")], str(tmp_path / "out"), val_fraction=0.1,
                              shard_tokens=4096, block_bytes=1000)
    n_val = round(len(text) * 0.1)
    assert manifest["splits"]["val"]["n_tokens"] == n_val
    assert manifest["splits"]["train"]["n_tokens"] == len(text) - n_val
    assert len(manifest["splits"]["train"]["shards"]) == -(-(len(text) - n_val) // 4096)
    assert all(s["n_tokens"] <= 4096 for split in manifest["splits"].values() for s in split["shards"])
    assert split_bytes(tmp_path / "out", "train") == text[:-n_val]
    assert split_bytes(tmp_path / "out", "val") == text[-n_val:]


def test_directories_globs_gzip_and_zip_are_read_in_sorted_order(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.txt").write_bytes(b"B\n")
    (src / "sub" / "a.txt").write_bytes(b"SUB-A\n")
    (src / "a.txt").write_bytes(b"A\n")
    (src / "skip.md").write_bytes(b"not matched\n")
    (src / ".hidden.txt").write_bytes(b"hidden\n")
    with gzip.open(tmp_path / "c.txt.gz", "wb") as f:
        f.write(b"GZ\n")
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        zf.writestr("z.txt", b"ZIP-Z\n")
        zf.writestr("y/", b"")
        zf.writestr("m.txt", b"ZIP-M\n")

    manifest = prepare_corpus([str(src), str(tmp_path / "*.gz"), str(tmp_path / "d.zip")], str(tmp_path / "out"),
                              pattern="*.txt", val_fraction=0.0)
    assert split_bytes(tmp_path / "out", "train") == b"A\nB\nSUB-A\nGZ\nZIP-M\nZIP-Z\n"
    assert [(s["files"], s["bytes"]) for s in manifest["sources"]] == [(3, 10), (1, 3), (2, 12)]
    assert manifest["splits"]["val"] == {"n_tokens": 0, "shards": []}


def test_repreparing_replaces_shards_and_removes_stale_ones(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"x" * 5000)
    out = tmp_path / "out"
    prepare_corpus([str(tmp_path / "a.txt")], str(out), shard_tokens=1000, val_fraction=0.0)
    assert len(list(out.glob("train-*.bin"))) == 5
    (tmp_path / "a.txt").write_bytes(b"y" * 1500)
    manifest = prepare_corpus([str(tmp_path / "a.txt")], str(out), shard_tokens=1000, val_fraction=0.0)
    assert sorted(os.listdir(out)) == ["manifest.json", "train-00000.bin", "train-00001.bin"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert split_bytes(out, "train") == b"y" * 1500


def test_a_failed_preparation_keeps_the_previous_data_and_leaves_no_temp_files(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(b"x" * 5000)
    out = tmp_path / "out"
    before = prepare_corpus([str(tmp_path / "a.txt")], str(out), val_fraction=0.0)
    files_before = sorted(os.listdir(out))

    real = ByteTokenizer.encode_block
    calls = []

    def fail_on_third_block(self, block):
        calls.append(len(block))
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, block)

    monkeypatch.setattr(ByteTokenizer, "encode_block", fail_on_third_block)
    (tmp_path / "a.txt").write_bytes(b"y" * 5000)
    with pytest.raises(OSError, match="disk full"):
        prepare_corpus([str(tmp_path / "a.txt")], str(out), block_bytes=1000, shard_tokens=1000)
    assert sorted(os.listdir(out)) == files_before
    assert load_manifest(str(out), verify_checksums=True) == before


def test_token_ids_outside_the_vocabulary_are_a_data_error(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_bytes(b"\xff")
    real = ByteTokenizer.encode_block
    monkeypatch.setattr(ByteTokenizer, "encode_block", lambda self, block: real(self, block) + 1)
    with pytest.raises(DataError, match="id 256, outside its vocabulary of 256"):
        prepare_corpus([str(tmp_path / "a.txt")], str(tmp_path / "out"))


@pytest.mark.parametrize("case, message", [
    ("missing.txt", "input not found"),
    ("nothing-*.txt", "has no files"),
    ("empty-dir", "has no files"),
    ("empty.txt", "hold no text"),
    ("corrupt.gz", r"corrupt\.gz: cannot read"),
    ("corrupt.zip", r"corrupt\.zip: not a valid zip file"),
])
def test_missing_empty_or_corrupt_input_is_a_data_error(tmp_path, case, message):
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "corrupt.gz").write_bytes(b"plain text, not gzip")
    (tmp_path / "corrupt.zip").write_bytes(b"plain text, not zip")
    with pytest.raises(DataError, match=message):
        prepare_corpus([str(tmp_path / case)], str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_enwik8_must_be_the_only_input(tmp_path):
    (tmp_path / "enwik8").write_bytes(b"x" * 10)
    (tmp_path / "a.txt").write_bytes(b"a")
    with pytest.raises(DataError, match="only input"):
        prepare_corpus([str(tmp_path / "enwik8"), str(tmp_path / "a.txt")], str(tmp_path / "out"),
                       enwik8_splits=(("train", 8), ("val", 1), ("test", 1)))
