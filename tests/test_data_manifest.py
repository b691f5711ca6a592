"""Data-directory verification: sizes on every load, sha256 on demand, a DataError naming the file."""

from __future__ import annotations

import json

import pytest

from reformer_dist.data import TokenWindowDataset, load_manifest, prepare_corpus
from reformer_dist.errors import DataError


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 40)
    prepare_corpus([str(tmp_path / "a.txt")], str(tmp_path / "data"), shard_tokens=4000, val_fraction=0.1)
    return tmp_path / "data"


def test_a_fresh_directory_verifies_with_checksums(data_dir):
    manifest = load_manifest(str(data_dir), verify_checksums=True)
    assert [len(s["shards"]) for s in manifest["splits"].values()] == [3, 1]


def test_flipped_byte_is_caught_by_the_checksum_not_by_the_size_check(data_dir):
    shard = data_dir / "train-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[123] ^= 0x01
    shard.write_bytes(bytes(raw))
    load_manifest(str(data_dir))  # sizes still match: the cheap check cannot see it
    with pytest.raises(DataError, match=r"train-00001\.bin: sha256 does not match"):
        load_manifest(str(data_dir), verify_checksums=True)
    with pytest.raises(DataError, match=r"train-00001\.bin: sha256"):
        TokenWindowDataset(str(data_dir), "train", seq_len=16, verify_checksums=True)


def test_truncated_shard_is_caught_on_every_load(data_dir):
    shard = data_dir / "val-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match=r"val-00000\.bin: 1,023 bytes but the manifest says 1,024"):
        load_manifest(str(data_dir))
    with pytest.raises(DataError, match="truncated"):
        TokenWindowDataset(str(data_dir), "train", seq_len=16)


def test_missing_shard_and_missing_manifest(data_dir):
    (data_dir / "train-00002.bin").unlink()
    with pytest.raises(DataError, match=r"train-00002\.bin: missing"):
        load_manifest(str(data_dir))
    (data_dir / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"no manifest\.json"):
        load_manifest(str(data_dir))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(vocab_size=300), "does not fit dtype 'uint8'"),
    (lambda m: m["splits"]["train"].pop("shards"), "malformed manifest"),
    (lambda m: m["splits"]["val"].update(n_tokens=5), "not the sum of its shards"),
    (lambda m: m.update(version=99), "not a reformer-dist-tokens v1 manifest"),
])
def test_inconsistent_manifest_is_a_data_error(data_dir, edit, message):
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        load_manifest(str(data_dir))


@pytest.mark.parametrize("entry", ["../../../etc/passwd", "/etc/passwd", "escape.bin"])
def test_manifest_entries_outside_the_data_directory_are_refused(data_dir, tmp_path, entry):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 4000)
    (data_dir / "escape.bin").symlink_to(outside)  # a link inside that points outside counts as outside
    path = data_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = entry
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=f"entry '{entry}' is not a file inside the data directory"):
        load_manifest(str(data_dir))


def test_overwritten_shard_with_ids_past_the_vocabulary_is_named_when_read(tmp_path):
    (tmp_path / "a.txt").write_text("abc " * 200)
    prepare_corpus([str(tmp_path / "a.txt")], str(tmp_path / "data"), tokenizer="bytes", byte_offset=2,
                   dtype="uint16", val_fraction=0.1)
    shard = tmp_path / "data" / "train-00000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # same size: only the ids give it away
    dataset = TokenWindowDataset(str(tmp_path / "data"), "train", seq_len=16)
    with pytest.raises(DataError, match=r"train-00000\.bin: token id 65535 is outside the vocabulary \(258 ids\)"):
        dataset[0]
