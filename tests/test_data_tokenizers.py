"""Tokenizers (bytes, HF tokenizers JSON, sentencepiece) and their round trip through prepared shards."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from reformer_dist.data import TokenWindowDataset, get_tokenizer, parse_tokenizer_arg, prepare_corpus
from reformer_dist.data.shards import load_manifest
from reformer_dist.errors import DataError

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "hashed", "buckets", "sort",
         "chunks", "of", "attention"]


@pytest.fixture(scope="module")
def corpus_lines() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(300)]


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory, corpus_lines) -> str:
    """A tiny byte-level BPE trained on the spot (lossless: any text decodes back exactly)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus_lines, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def spm_model_file(tmp_path_factory, corpus_lines) -> str:
    """A tiny sentencepiece BPE model; identity normalisation and a newline piece make it lossless here."""
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("spm") / "spiece"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines), model_prefix=str(prefix), vocab_size=60,
                                   model_type="bpe", normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, user_defined_symbols=["\n"], minloglevel=2)
    return f"{prefix}.model"


def test_bytes_round_trip_with_offset_keeps_low_ids_free():
    tok = get_tokenizer({"kind": "bytes", "offset": 2})
    text = "naïve ✓ Reformer\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 258
    assert min(ids) >= 2 and ids[0] == ord("n") + 2
    assert tok.decode(ids) == text
    assert tok.decode([0, 1, *ids]) == text  # pad/special ids carry no byte


def test_hf_tokenizers_round_trip(hf_tokenizer_file, corpus_lines):
    tok = get_tokenizer(hf_tokenizer_file)
    text = "\n".join(corpus_lines[:20]) + "\n unseen wörds ✓\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 300
    assert len(ids) < len(text.encode())  # merges were learnt and used
    assert tok.decode(ids) == text


def test_sentencepiece_round_trip(spm_model_file, corpus_lines):
    tok = get_tokenizer(spm_model_file)
    text = "\n".join(corpus_lines[:20])
    ids = tok.encode(text)
    assert tok.vocab_size == 60
    assert max(ids) < 60 and len(ids) < len(text)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("kind", ["bytes", "hf_tokenizers", "sentencepiece"])
def test_prepared_tokens_decode_back_to_the_corpus(tmp_path, kind, corpus_lines, hf_tokenizer_file,
                                                   spm_model_file):
    text = "\n".join(corpus_lines) + "\n"
    (tmp_path / "corpus.txt").write_text(text)
    tokenizer = {"bytes": "bytes", "hf_tokenizers": hf_tokenizer_file, "sentencepiece": spm_model_file}[kind]
    # sentencepiece marks the start of every block it encodes; one block keeps that out of the comparison
    block_bytes = 1 << 20 if kind == "sentencepiece" else 997
    manifest = prepare_corpus([str(tmp_path / "corpus.txt")], str(tmp_path / "data"), tokenizer=tokenizer,
                              val_fraction=0.1, block_bytes=block_bytes, shard_tokens=1000)
    assert manifest["tokenizer"]["kind"] == kind
    assert sum(s["n_tokens"] for s in manifest["splits"].values()) > 0
    assert manifest["splits"]["val"]["n_tokens"] > 0

    # train then val is the whole stream; the tokenizer is rebuilt from the data directory alone
    ds = {split: TokenWindowDataset(str(tmp_path / "data"), split, seq_len=8) for split in ("train", "val")}
    stream = np.concatenate([d.tokens(0, d.n_tokens) for d in ds.values()])
    tok = get_tokenizer(ds["train"].tokenizer_spec)
    assert tok.decode(stream.tolist()) == text
    assert ds["train"].vocab_size == tok.vocab_size


def test_multiprocess_tokenizing_writes_identical_shards(tmp_path, hf_tokenizer_file, corpus_lines):
    (tmp_path / "a.txt").write_text("\n".join(corpus_lines * 5))
    manifests = [prepare_corpus([str(tmp_path / "a.txt")], str(tmp_path / f"out{w}"), hf_tokenizer_file,
                                workers=w, block_bytes=2048) for w in (1, 2)]
    assert manifests[0]["splits"]["train"]["n_tokens"] > 0
    assert manifests[0]["splits"] == manifests[1]["splits"]  # same token counts and sha256 per shard


def test_file_tokenizer_is_copied_into_the_data_dir_and_verified(tmp_path, hf_tokenizer_file, corpus_lines):
    (tmp_path / "corpus.txt").write_text("\n".join(corpus_lines))
    prepare_corpus([str(tmp_path / "corpus.txt")], str(tmp_path / "data"), tokenizer=hf_tokenizer_file)
    copy = tmp_path / "data" / "tokenizer.json"
    with open(hf_tokenizer_file, "rb") as f:
        assert copy.read_bytes() == f.read()
    copy.write_bytes(copy.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"tokenizer\.json"):
        load_manifest(str(tmp_path / "data"))


def test_tokenizer_argument_resolution(tmp_path, spm_model_file):
    assert parse_tokenizer_arg("bytes", 2) == {"kind": "bytes", "offset": 2}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.link(spm_model_file, model_dir / "spiece.model")
    assert parse_tokenizer_arg(str(model_dir))["kind"] == "sentencepiece"
    with pytest.raises(DataError, match="neither"):
        parse_tokenizer_arg(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="only applies to the bytes"):
        parse_tokenizer_arg(spm_model_file, byte_offset=2)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizers JSON"):
        get_tokenizer(str(tmp_path / "broken.json"))


def test_vocab_that_does_not_fit_the_dtype_is_rejected(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="258 ids does not fit uint8"):
        prepare_corpus([str(tmp_path / "a.txt")], str(tmp_path / "out"), byte_offset=2, dtype="uint8")
    manifest = prepare_corpus([str(tmp_path / "a.txt")], str(tmp_path / "out"), byte_offset=2)
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 258
