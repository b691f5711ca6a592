"""``prepare_corpus``: stream text inputs through a tokenizer into token shards plus a manifest.

The inputs are read in line-aligned blocks of about ``block_bytes`` (memory stays O(block_bytes *
workers) whatever the corpus size), tokenized in order — in a process pool for the text tokenizers,
in-process for raw bytes, where tokenizing is a copy — and appended to the split's shards.

Splits: enwik8 comes with its own byte ranges (90M train / 5M val / 5M test). Any other corpus is one
token stream whose last ``val_fraction`` becomes ``val``: contiguous, so no validation text also sits in
a training window, and exact in size whatever the number of files. Its length is only known at the end,
so the tail is moved out of the train shards once everything is written (it is small: 0.5% by default).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import zipfile
import zlib
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from reformer_dist.atomic_write import atomic_write
from reformer_dist.data.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    ShardWriter,
    dtype_for_vocab,
    sha256_file,
    write_json_atomic,
)
from reformer_dist.data.sources import ENWIK8_SPLITS, Source, read_blocks, resolve_inputs
from reformer_dist.data.tokenizer import Tokenizer, get_tokenizer, parse_tokenizer_arg
from reformer_dist.errors import DataError

TOKENIZER_FILES = {"hf_tokenizers": "tokenizer.json", "sentencepiece": "spiece.model"}


def prepare_corpus(
    inputs: list[str],
    output_dir: str,
    tokenizer: str = "bytes",
    byte_offset: int = 0,
    val_fraction: float = 0.005,
    *,
    workers: int = 1,
    pattern: str = "*",
    dtype: str | None = None,
    shard_tokens: int = 1 << 27,
    block_bytes: int = 1 << 20,
    enwik8_splits: tuple[tuple[str, int], ...] = ENWIK8_SPLITS,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``output_dir`` and return the manifest written there.

    inputs: paths, directories, globs, ``stdlib`` or an enwik8 file (see :mod:`reformer_dist.data.sources`).
    tokenizer: 'bytes' (ids = byte + ``byte_offset``), a tokenizer.json, a spiece.model, or a model
        directory holding one; file tokenizers are copied into ``output_dir``.
    val_fraction: tail of the token stream that becomes the 'val' split (ignored for enwik8).
    workers: tokenizer processes (0 = one per CPU); raw bytes are always tokenized in-process.
    pattern: file-name glob applied inside input directories.
    dtype: force the shard dtype (default: the smallest that holds the vocabulary).
    shard_tokens: tokens per shard file; block_bytes: input read size per tokenizer call.
    enwik8_splits: (split, n_bytes) ranges of an enwik8 input (tests pass scaled-down sizes).
    progress: draw a rich progress bar on stderr.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    spec = parse_tokenizer_arg(tokenizer, byte_offset)
    tok = get_tokenizer(spec)
    np_dtype = dtype_for_vocab(tok.vocab_size, dtype)
    sources = resolve_inputs(inputs, pattern, enwik8_splits)
    enwik8 = sources[0].documents[0].ranges is not None
    split_names = [name for name, _ in enwik8_splits] if enwik8 else ["train", "val"]

    os.makedirs(output_dir, exist_ok=True)
    writers = {name: ShardWriter(output_dir, name, np_dtype, shard_tokens) for name in split_names}
    try:
        source_bytes = _tokenize_into(sources, tok, writers, np_dtype, workers, block_bytes, progress)
        for w in writers.values():
            w.close()
        if writers["train"].n_tokens == 0:
            raise DataError(f"the inputs hold no text ({', '.join(inputs)}): nothing to train on")
        if not enwik8:
            n_total = writers["train"].n_tokens
            _move_tail(writers["train"], writers["val"], min(round(n_total * val_fraction), n_total - 1))
        # Commit: drop the old manifest first, so a crash from here on leaves a directory that says
        # "not prepared" rather than a manifest describing shards that were half replaced.
        stale = _previous_shards(output_dir)
        if os.path.exists(os.path.join(output_dir, MANIFEST)):
            os.remove(os.path.join(output_dir, MANIFEST))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": _store_tokenizer(spec, output_dir),
            "vocab_size": tok.vocab_size,
            "dtype": np_dtype.name,
            "splits": {name: w.commit() for name, w in writers.items()},
            "split_rule": ({"kind": "enwik8", "bytes": dict(enwik8_splits)} if enwik8 else
                           {"kind": "tail", "val_fraction": val_fraction}),
            "sources": [{"input": s.input, "files": len(s.documents), "bytes": n, **s.extra()}
                        for s, n in zip(sources, source_bytes)],
        }
        fresh = {s["file"] for split in manifest["splits"].values() for s in split["shards"]}
        for file in stale - fresh:
            os.remove(os.path.join(output_dir, file))
        write_json_atomic(os.path.join(output_dir, MANIFEST), manifest)
        return manifest
    except BaseException:
        for w in writers.values():
            w.discard()
        raise


def _tokenize_into(sources: list[Source], tok: Tokenizer, writers: dict[str, ShardWriter],
                   dtype: np.dtype, workers: int, block_bytes: int, progress: bool) -> list[int]:
    """Stream every document's blocks through the tokenizer into the writers; bytes read per source."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    sizes = [d.size for s in sources for d in s.documents]
    total = None if None in sizes else sum(sizes)
    source_bytes = [0] * len(sources)

    def blocks() -> Iterator[tuple[int, str, bytes]]:
        for i, source in enumerate(sources):
            for doc in source.documents:
                try:
                    with doc.open() as stream:
                        for split, limit in doc.ranges or (("train", None),):
                            for block in read_blocks(stream, block_bytes, limit):
                                yield i, split, block
                except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
                    # a corrupt archive or an unreadable file is the user's to fix: name it
                    raise DataError(f"{doc.name}: cannot read ({e})") from None

    columns = (TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("tokenizing", total=total)
        for (i, split, n_bytes), ids in _encode_all(blocks(), tok, dtype, workers):
            writers[split].write(ids)
            source_bytes[i] += n_bytes
            bar.advance(task, n_bytes)
    return source_bytes


def _encode_all(blocks: Iterator[tuple[int, str, bytes]], tok: Tokenizer, dtype: np.dtype,
                workers: int) -> Iterator[tuple[tuple[int, str, int], np.ndarray]]:
    """((source, split, n_bytes), ids) per block, in input order."""
    if workers == 0:  # the CPUs this process may run on (taskset / Slurm affinity), not the machine's
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers == 1 or tok.spec["kind"] == "bytes":
        for i, split, block in blocks:
            yield (i, split, len(block)), _encode(tok, block, dtype)
        return
    # spawn, not fork: the parent may hold threads (torch, the tokenizers' own pools) that fork breaks.
    # At most 2 blocks per worker are in flight, which bounds memory (Pool.imap would read ahead freely).
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok.spec, dtype.str)) as pool:
        pending: deque = deque()
        for i, split, block in blocks:
            pending.append(((i, split, len(block)), pool.apply_async(_encode_in_worker, (block,))))
            if len(pending) >= 2 * workers:
                key, result = pending.popleft()
                yield key, result.get()
        while pending:
            key, result = pending.popleft()
            yield key, result.get()


def _encode(tok: Tokenizer, block: bytes, dtype: np.dtype) -> np.ndarray:
    ids = tok.encode_block(block)
    if len(ids) and (ids.min() < 0 or ids.max() >= tok.vocab_size):
        bad = int(ids.max() if ids.max() >= tok.vocab_size else ids.min())
        raise DataError(f"tokenizer produced id {bad}, outside its vocabulary of {tok.vocab_size}")
    return ids.astype(dtype)


_worker_state: tuple[Tokenizer, np.dtype] | None = None


def _init_worker(spec: dict, dtype: str) -> None:
    global _worker_state
    _worker_state = (get_tokenizer(spec), np.dtype(dtype))


def _encode_in_worker(block: bytes) -> np.ndarray:
    assert _worker_state is not None
    return _encode(_worker_state[0], block, _worker_state[1])


def _move_tail(train: ShardWriter, val: ShardWriter, n_val: int) -> None:
    """Move the last ``n_val`` tokens of the train shards into the val shards."""
    if n_val == 0:
        return
    for ids in train.read_tail(n_val):
        val.write(ids)
    val.close()
    train.truncate(train.n_tokens - n_val)


def _store_tokenizer(spec: dict, output_dir: str) -> dict:
    """The manifest's tokenizer entry; a file tokenizer is copied next to the shards (atomically)."""
    if spec["kind"] == "bytes":
        return dict(spec)
    file = TOKENIZER_FILES[spec["kind"]]
    dest = os.path.join(output_dir, file)
    if os.path.abspath(spec["path"]) != os.path.abspath(dest):
        atomic_write(dest, lambda tmp: shutil.copyfile(spec["path"], tmp))
    return {"kind": spec["kind"], "path": file, "bytes": os.path.getsize(dest), "sha256": sha256_file(dest),
            "source": os.path.abspath(spec["path"])}


def _previous_shards(output_dir: str) -> set[str]:
    """Shard files named by an existing manifest in ``output_dir`` (removed if no longer used)."""
    try:
        with open(os.path.join(output_dir, MANIFEST)) as f:
            old = json.load(f)
        files = {s["file"] for split in old["splits"].values() for s in split["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    # only plain shard names: a hand-edited manifest must not make us delete files elsewhere
    return {f for f in files if isinstance(f, str) and f == os.path.basename(f) and f.endswith(".bin")}
