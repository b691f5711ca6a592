"""The on-disk format of a prepared data directory, and its verification.

A data directory holds, per split, token shards ``{split}-{i:05d}.bin``: raw little-endian unsigned
integers (uint8 when the vocabulary fits 256 ids, else uint16, else uint32) that ``np.memmap`` reads
without copying. The split's token stream is the shards concatenated in order. ``manifest.json``
describes them and is written last, so a directory with a manifest is complete::

    {"format": "reformer-dist-tokens", "version": 1,
     "tokenizer": {"kind": "bytes", "offset": 0},          # or {"kind": ..., "path": "tokenizer.json",
                                                           #     "bytes": ..., "sha256": ...} (a copy)
     "vocab_size": 256, "dtype": "uint8",
     "splits": {"train": {"n_tokens": N, "shards": [{"file": "train-00000.bin", "n_tokens": n,
                                                      "bytes": b, "sha256": "..."}]}, "val": {...}},
     "split_rule": {...}, "sources": [{"input": "stdlib", "files": 734, "bytes": 12118641, ...}]}

Sizes are checked on every load (a stat per shard); sha256 only when asked, since hashing 100 GB
at every training start would cost minutes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from reformer_dist.atomic_write import fsync_file, write_text_atomic
from reformer_dist.errors import DataError

FORMAT = "reformer-dist-tokens"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("uint8", "uint16", "uint32")


def dtype_for_vocab(vocab_size: int, dtype: str | None = None) -> np.dtype:
    """The smallest shard dtype holding ids [0, vocab_size), or ``dtype`` if given and large enough."""
    if dtype is not None and dtype not in DTYPES:
        raise DataError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    for name in [dtype] if dtype else DTYPES:
        if vocab_size <= np.iinfo(name).max + 1:
            return np.dtype(name).newbyteorder("<")
    raise DataError(f"a vocabulary of {vocab_size:,} ids does not fit {dtype or 'uint32'} "
                    f"(at most {np.iinfo(dtype or 'uint32').max + 1:,} ids)")


def sha256_file(path: str, block_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file + os.replace, so readers see the old or the new file."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n", fsync=True)


class ShardWriter:
    """Appends a split's tokens to shards of at most ``shard_tokens`` tokens.

    Shards are written under temporary names (``.{split}-00000.bin.tmp<pid>``) and get their final
    names in :meth:`commit`, so an interrupted preparation never leaves a file that looks finished.
    """

    def __init__(self, output_dir: str, split: str, dtype: np.dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.output_dir, self.split, self.dtype, self.shard_tokens = output_dir, split, dtype, shard_tokens
        self.shard_sizes: list[int] = []  # tokens in each shard so far
        self._file = None

    @property
    def n_tokens(self) -> int:
        return sum(self.shard_sizes)

    def name(self, i: int) -> str:
        return f"{self.split}-{i:05d}.bin"

    def tmp_path(self, i: int) -> str:
        return os.path.join(self.output_dir, f".{self.name(i)}.tmp{os.getpid()}")

    def write(self, ids: np.ndarray) -> None:
        """Append ids (any integer dtype, shape (n,), values already checked against the vocab)."""
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None or self.shard_sizes[-1] == self.shard_tokens:
                self._open_next()
            take = min(len(ids), self.shard_tokens - self.shard_sizes[-1])
            self._file.write(ids[:take].tobytes())
            self.shard_sizes[-1] += take
            ids = ids[take:]

    def _open_next(self) -> None:
        self.close()
        # held open across write() calls and closed in close(): no with-block can span them
        self._file = open(self.tmp_path(len(self.shard_sizes)), "wb")  # noqa: SIM115
        self.shard_sizes.append(0)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read_tail(self, n: int, block_tokens: int = 1 << 20) -> Iterator[np.ndarray]:
        """Yield the last ``n`` tokens in order, in blocks (the writer must be closed)."""
        start = self.n_tokens - n
        offset = 0
        for i, size in enumerate(self.shard_sizes):
            lo, hi = max(start - offset, 0), size
            offset += size
            if lo >= hi:
                continue
            tokens = np.memmap(self.tmp_path(i), dtype=self.dtype, mode="r")
            for b in range(lo, hi, block_tokens):
                yield np.array(tokens[b:min(b + block_tokens, hi)])
            del tokens

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` tokens (the writer must be closed): drop later shards, cut one."""
        kept = 0
        for i, size in enumerate(list(self.shard_sizes)):
            keep = min(size, max(n - kept, 0))
            if keep == 0:
                os.remove(self.tmp_path(i))
            elif keep < size:
                os.truncate(self.tmp_path(i), keep * self.dtype.itemsize)
            kept += size
            self.shard_sizes[i] = keep
        self.shard_sizes = [s for s in self.shard_sizes if s]

    def commit(self) -> dict[str, Any]:
        """Hash each shard, give it its final name, and return the split's manifest entry."""
        self.close()
        shards = []
        for i, size in enumerate(self.shard_sizes):
            path = os.path.join(self.output_dir, self.name(i))
            digest = sha256_file(self.tmp_path(i))
            fsync_file(self.tmp_path(i))  # on disk before it is named, so a power cut cannot leave a hole
            os.replace(self.tmp_path(i), path)
            shards.append({"file": self.name(i), "n_tokens": size, "bytes": size * self.dtype.itemsize,
                           "sha256": digest})
        return {"n_tokens": self.n_tokens, "shards": shards}

    def discard(self) -> None:
        """Remove the temporary shards (after a failure)."""
        self.close()
        for i in range(len(self.shard_sizes)):
            if os.path.exists(self.tmp_path(i)):
                os.remove(self.tmp_path(i))
        self.shard_sizes = []


def load_manifest(data_dir: str, verify_checksums: bool = False) -> dict[str, Any]:
    """Read and check ``data_dir/manifest.json``.

    Always: the format, the dtype against the vocabulary, that every shard (and the tokenizer copy) lies
    inside ``data_dir`` (symbolic links resolved), and their sizes. With ``verify_checksums``: their
    sha256 too (reads every byte). A mismatch raises DataError naming the file.
    """
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{data_dir}: no {MANIFEST} (not a prepared data directory, or preparation was "
                        f"interrupted); run `reformer-dist prepare-data --output {data_dir} ...`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{path}: not a {FORMAT} v{VERSION} manifest")
    try:
        dtype = str(manifest["dtype"])
        if dtype not in DTYPES or int(manifest["vocab_size"]) > np.iinfo(dtype).max + 1:
            raise DataError(f"{path}: vocab_size {manifest['vocab_size']} does not fit dtype {dtype!r}")
        files = []  # (file, bytes, sha256) of everything the manifest vouches for
        for split_name, split in manifest["splits"].items():
            for s in split["shards"]:
                if s["bytes"] != s["n_tokens"] * np.dtype(dtype).itemsize:
                    raise DataError(f"{path}: shard {s['file']} of split {split_name!r} has inconsistent "
                                    f"n_tokens and bytes")
                files.append((s["file"], s["bytes"], s["sha256"]))
            if split["n_tokens"] != sum(s["n_tokens"] for s in split["shards"]):
                raise DataError(f"{path}: split {split_name!r} n_tokens is not the sum of its shards")
        tok = manifest["tokenizer"]
        if "path" in tok:
            files.append((tok["path"], tok["bytes"], tok["sha256"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    root = os.path.realpath(data_dir)
    for file, size, digest in files:
        fpath = os.path.join(data_dir, str(file))
        if not isinstance(file, str) or os.path.commonpath([root, os.path.realpath(fpath)]) != root:
            # a manifest is input like any other: it must not make us read files elsewhere
            raise DataError(f"{path}: entry {file!r} is not a file inside the data directory {data_dir}")
        if not os.path.isfile(fpath):
            raise DataError(f"{fpath}: missing (listed in {MANIFEST}); re-run prepare-data")
        actual = os.path.getsize(fpath)
        if actual != size:
            raise DataError(f"{fpath}: {actual:,} bytes but the manifest says {size:,} "
                            f"(truncated or overwritten); re-run prepare-data")
        if verify_checksums and sha256_file(fpath) != digest:
            raise DataError(f"{fpath}: sha256 does not match the manifest (corrupted); re-run prepare-data")
    return manifest
