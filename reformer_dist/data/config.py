"""The ``data:`` section of a run config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    path: str = "runs/data/stdlib"
    """A directory written by `reformer-dist prepare-data` (manifest.json plus token shards)."""
    train_split: str = "train"
    """Split used for training."""
    val_split: str = "val"
    """Split used for periodic evaluation (skipped if the manifest has no tokens for it)."""
    shuffle: bool = True
    """Visit training windows in a seed-driven random order (false: in file order)."""
    verify_checksums: bool = False
    """Hash every shard against its manifest sha256 before training starts (rank 0 reads the whole corpus
    once; a mismatch stops the launch naming the file) and in `reformer-dist eval`. Shard sizes are checked
    either way; `reformer-dist prepare-data --verify DIR` does the full check alone."""
