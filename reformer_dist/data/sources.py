"""Corpus inputs: turn the ``--input`` arguments into an ordered list of documents, and read them in blocks.

An input is one of
  * ``stdlib``: the running interpreter's standard library ``.py`` files (present on every machine;
    write ``./stdlib`` for a path of that name);
  * a file: plain text, ``.gz`` (one document) or ``.zip`` (one document per member, by name);
  * a directory: every file under it whose name matches ``pattern`` (recursive; hidden entries skipped);
  * a glob such as ``data/**/*.txt`` (quoted, so the shell leaves it to us);
  * the enwik8 file (``enwik8`` or ``enwik8.zip``): one document cut into the standard byte ranges.

Order is deterministic (sorted relative paths) so the same inputs always give the same token stream.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import gzip
import os
import sys
import sysconfig
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import BinaryIO

from reformer_dist.errors import DataError

# The enwik8 benchmark split (Hutter prize data, 10^8 bytes): train, validation, test byte counts.
ENWIK8_SPLITS: tuple[tuple[str, int], ...] = (("train", 90_000_000), ("val", 5_000_000), ("test", 5_000_000))
ENWIK8_NAMES = ("enwik8", "enwik8.zip")

# Left out of the stdlib corpus: third-party packages, and the test suites (large, repetitive, and full
# of deliberately malformed files).
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass
class Document:
    name: str
    """Where the bytes come from, for messages (a path, or 'archive.zip:member')."""
    size: int | None
    """Uncompressed size in bytes when known without reading (None for .gz)."""
    open: Callable[[], AbstractContextManager[BinaryIO]]
    """Opens a binary stream over the document's bytes (use it in a ``with``)."""
    ranges: tuple[tuple[str, int], ...] | None = None
    """Consecutive (split, n_bytes) ranges the document is cut into (enwik8); None = the shared stream."""


@dataclass
class Source:
    """One ``--input`` argument and what it resolved to (recorded in the manifest)."""

    input: str
    documents: list[Document] = field(default_factory=list)

    def extra(self) -> dict:
        """Provenance beyond the input string: the stdlib corpus depends on the Python version."""
        return {"python": sys.version.split()[0]} if self.input == "stdlib" else {}


def resolve_inputs(inputs: list[str], pattern: str = "*",
                   enwik8_splits: tuple[tuple[str, int], ...] = ENWIK8_SPLITS) -> list[Source]:
    """Resolve every input to its documents; DataError for a missing input or one with no files."""
    if not inputs:
        raise DataError("no input given (pass --input PATH..., or --input stdlib)")
    sources = [Source(item, _documents(item, pattern, enwik8_splits)) for item in inputs]
    for source in sources:
        if not source.documents:
            raise DataError(f"input {source.input!r} has no files" +
                            (f" matching {pattern!r}" if os.path.isdir(source.input) else ""))
    if len(sources) > 1 and any(d.ranges for s in sources for d in s.documents):
        raise DataError("enwik8 must be the only input: it comes with its own train/val/test split")
    return sources


def stdlib_files() -> list[str]:
    """The interpreter's standard library ``.py`` files, sorted by path relative to the stdlib root."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        found += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: os.path.relpath(p, root).split(os.sep))


def _documents(item: str, pattern: str, enwik8_splits: tuple[tuple[str, int], ...]) -> list[Document]:
    if item == "stdlib":
        return [_plain(p) for p in stdlib_files()]
    if os.path.basename(item) in ENWIK8_NAMES and os.path.isfile(item):
        return [_enwik8(item, enwik8_splits)]
    if os.path.isdir(item):
        return [doc for path in _walk(item, pattern) for doc in _file_documents(path)]
    if os.path.isfile(item):
        return _file_documents(item)
    if glob.has_magic(item):
        paths = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        return [doc for path in paths for doc in _file_documents(path)]
    raise DataError(f"input not found: {item}")


def _walk(root: str, pattern: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [os.path.join(dirpath, f) for f in filenames
                  if not f.startswith(".") and fnmatch.fnmatch(f, pattern)]
    return sorted(found, key=lambda p: os.path.relpath(p, root).split(os.sep))


def _file_documents(path: str) -> list[Document]:
    if path.endswith(".gz"):
        return [Document(path, None, lambda: gzip.open(path, "rb"))]
    if path.endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as zf:
                members = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename)
        except zipfile.BadZipFile as e:
            raise DataError(f"{path}: not a valid zip file ({e})") from None
        return [Document(f"{path}:{m.filename}", m.file_size, _zip_opener(path, m.filename)) for m in members]
    return [_plain(path)]


def _plain(path: str) -> Document:
    return Document(path, os.path.getsize(path), lambda: open(path, "rb"))


def _zip_opener(path: str, member: str) -> Callable[[], AbstractContextManager[BinaryIO]]:
    @contextlib.contextmanager
    def open_member() -> Iterator[BinaryIO]:
        with zipfile.ZipFile(path) as zf, zf.open(member) as stream:
            yield stream  # type: ignore[misc]
    return open_member


def _enwik8(path: str, splits: tuple[tuple[str, int], ...]) -> Document:
    docs = _file_documents(path)
    if path.endswith(".zip"):
        docs = [d for d in docs if d.name.endswith(":enwik8")]
    if len(docs) != 1:
        raise DataError(f"{path}: expected one member named 'enwik8' in the archive")
    doc = docs[0]
    expected = sum(n for _, n in splits)
    if doc.size != expected:
        raise DataError(f"{doc.name}: enwik8 must be exactly {expected:,} bytes "
                        f"({' + '.join(f'{n:,} {s}' for s, n in splits)}), got {doc.size:,}")
    doc.ranges = splits
    return doc


def read_blocks(stream: BinaryIO, block_bytes: int, limit: int | None = None) -> Iterator[bytes]:
    """Blocks of about ``block_bytes`` from ``stream`` (at most ``limit`` bytes in all), each cut just
    after its last newline so text tokenizers never see a line split in two. A block with no newline is
    cut before a UTF-8 lead byte instead, so no character is split either. Memory: O(block_bytes).
    EOFError if ``limit`` is given and the stream ends before it."""
    carry = b""
    remaining = limit
    while True:
        want = block_bytes if remaining is None else min(block_bytes, remaining)
        chunk = stream.read(want) if want > 0 else b""
        if remaining is not None:
            remaining -= len(chunk)
        if not chunk:
            if remaining:
                raise EOFError(f"ended {remaining:,} bytes before its expected size")
            if carry:
                yield carry
            return
        buf = carry + chunk
        cut = buf.rfind(b"\n") + 1
        if cut == 0:
            # no newline: cut before the lead byte of the last character (stepping back over at most
            # three UTF-8 continuation bytes 10xxxxxx), which may be incomplete
            cut = len(buf) - 1
            while cut > 0 and len(buf) - cut < 4 and (buf[cut] & 0xC0) == 0x80:
                cut -= 1
            cut = cut or len(buf)
        yield buf[:cut]
        carry = buf[cut:]
