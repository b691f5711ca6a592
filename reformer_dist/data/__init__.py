"""The data pipeline: prepare corpora into memory-mapped token shards, read them as training windows in a
resumable, world-size-independent order.

    reformer-dist prepare-data --input stdlib --output runs/data/stdlib         # or prepare_corpus(...)
    ds = TokenWindowDataset("runs/data/stdlib", split="train", seq_len=256)     # ds[i]: int64 (257,)
    sampler = GlobalOrderSampler(len(ds), seed=1234, rank=rank, world_size=world_size)
    input_ids, targets = next_batch(ds, sampler, micro_batch_size)             # (B, 256) each

Modules: ``sources`` (inputs → documents), ``tokenizer``, ``shards`` (on-disk format, manifest,
verification), ``prepare``, ``dataset``, ``sampler``.
"""

from reformer_dist.data.dataset import TokenWindowDataset, next_batch
from reformer_dist.data.prepare import prepare_corpus
from reformer_dist.data.sample_order import GlobalOrderSampler
from reformer_dist.data.shards import load_manifest
from reformer_dist.data.tokenizer import Tokenizer, get_tokenizer, parse_tokenizer_arg

__all__ = [
    "GlobalOrderSampler",
    "TokenWindowDataset",
    "Tokenizer",
    "get_tokenizer",
    "load_manifest",
    "next_batch",
    "parse_tokenizer_arg",
    "prepare_corpus",
]
