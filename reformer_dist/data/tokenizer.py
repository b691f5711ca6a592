"""Tokenizers: raw bytes, a Hugging Face ``tokenizers`` JSON file, or a sentencepiece model.

A tokenizer is described by a small JSON-able *spec* so a data directory (and later a model) can say
which one it was built with and anyone can rebuild it::

    {"kind": "bytes", "offset": 2}                         # id = byte + offset (HF enwik8: offset 2, 0 = pad)
    {"kind": "hf_tokenizers", "path": ".../tokenizer.json"}
    {"kind": "sentencepiece", "path": ".../spiece.model"}

``get_tokenizer(spec)`` builds one from a spec or from the CLI's ``--tokenizer`` string.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from reformer_dist.errors import DataError

TOKENIZER_KINDS = ("bytes", "hf_tokenizers", "sentencepiece")


class Tokenizer(abc.ABC):
    """What the data pipeline and the model's users need: text <-> ids, and the vocabulary size."""

    spec: dict[str, Any]
    """The JSON-able description get_tokenizer() rebuilds this tokenizer from."""
    vocab_size: int
    """Number of ids; every id the tokenizer emits is below it."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def encode_block(self, block: bytes) -> np.ndarray:
        """Token ids (int64, shape (n,)) of a block of UTF-8 text read from a corpus file.

        Undecodable bytes become U+FFFD: corpora are text, and one bad byte should not stop a 100 GB job.
        """
        return np.asarray(self.encode(block.decode("utf-8", errors="replace")), dtype=np.int64)


class ByteTokenizer(Tokenizer):
    """Each UTF-8 byte is one token, shifted by ``offset`` so ids below it stay free for pad/specials."""

    def __init__(self, offset: int = 0):
        if offset < 0:
            raise DataError(f"byte offset must be >= 0, got {offset}")
        self.offset = offset
        self.vocab_size = 256 + offset
        self.spec = {"kind": "bytes", "offset": offset}

    def encode(self, text: str) -> list[int]:
        return self.encode_block(text.encode("utf-8")).tolist()

    def decode(self, ids: list[int]) -> str:
        # ids below the offset (pad, specials) carry no byte: drop them
        raw = bytes(i - self.offset for i in ids if self.offset <= i < self.offset + 256)
        return raw.decode("utf-8", errors="replace")

    def encode_block(self, block: bytes) -> np.ndarray:
        # exact bytes, no decoding: enwik8 is defined on bytes, and this is the hot path of prepare-data
        return np.frombuffer(block, dtype=np.uint8).astype(np.int64) + self.offset


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file (what ``tokenizer.json`` of a model repository holds)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise DataError(f"{path}: not a valid tokenizers JSON file ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.spec = {"kind": "hf_tokenizers", "path": path}

    def encode(self, text: str) -> list[int]:
        # no special tokens: corpora are encoded block by block, a BOS/EOS per block would be noise
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model file (``spiece.model``, e.g. google/reformer-crime-and-punishment's)."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a valid sentencepiece model ({e})") from None
        self.vocab_size = self._sp.GetPieceSize()
        self.spec = {"kind": "sentencepiece", "path": path}

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])


def parse_tokenizer_arg(name: str, byte_offset: int = 0) -> dict[str, Any]:
    """The spec for the CLI's ``--tokenizer``: 'bytes', a ``*.json`` file, a ``*.model`` file, or a
    directory holding ``tokenizer.json`` or ``spiece.model`` (a downloaded model repository)."""
    if name == "bytes":
        return {"kind": "bytes", "offset": byte_offset}
    if byte_offset:
        raise DataError(f"--byte-offset only applies to the bytes tokenizer, not {name}")
    path = os.path.abspath(name)
    if os.path.isdir(path):
        for file, kind in (("tokenizer.json", "hf_tokenizers"), ("spiece.model", "sentencepiece")):
            if os.path.isfile(os.path.join(path, file)):
                return {"kind": kind, "path": os.path.join(path, file)}
        raise DataError(f"{name}: directory has neither tokenizer.json nor spiece.model")
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {name!r} is neither 'bytes' nor an existing file")
    if path.endswith(".json"):
        return {"kind": "hf_tokenizers", "path": path}
    if path.endswith(".model"):
        return {"kind": "sentencepiece", "path": path}
    raise DataError(f"{name}: unknown tokenizer file type (expected tokenizer.json or a sentencepiece .model)")


def get_tokenizer(spec: str | Mapping[str, Any]) -> Tokenizer:
    """Build a tokenizer from a spec dict (as in a manifest / ``TokenWindowDataset.tokenizer_spec``)
    or from a ``--tokenizer`` string."""
    if isinstance(spec, str):
        spec = parse_tokenizer_arg(spec)
    kind = spec.get("kind")
    if kind == "bytes":
        offset = spec.get("offset", 0)
        if type(offset) is not int:
            raise DataError(f"the bytes tokenizer's offset must be an integer, got {offset!r}")
        return ByteTokenizer(offset)
    if kind not in TOKENIZER_KINDS:
        raise DataError(f"unknown tokenizer kind {kind!r}; expected one of {list(TOKENIZER_KINDS)}")
    path = str(spec.get("path"))
    if not os.path.isfile(path):
        raise DataError(f"tokenizer file not found: {path}")
    return HFTokenizer(path) if kind == "hf_tokenizers" else SentencePieceTokenizer(path)
