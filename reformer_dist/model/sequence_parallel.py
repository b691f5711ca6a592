"""Sequence parallelism, the model's side: what a ReformerLM needs to run on one shard of each sequence.

Under sequence parallelism (DeepSpeed-Ulysses) P ranks share every sample: rank r holds positions
[r*l, (r+1)*l), l = L/P, through the embeddings, the feed-forward blocks, the reversible streams and the
loss, all of which are position-wise. Attention is not: LSH hashes and sorts all positions of a head, local
windows and causal masks cross shard boundaries. Each attention layer therefore swaps layouts around its
kernel: an all-to-all turns (B, l, H, D) (every head of the local positions) into (B, L, H/P, D) (every
position of H/P heads), the kernel runs per head exactly as in one process, and a second all-to-all
returns its output to (B, l, H, D).

The model does not know how ranks talk: the trainer installs a ``SequenceShard`` with
``ReformerLM.shard_sequence`` (``reformer_dist.train.sequence_parallel`` builds one from DeepSpeed's
Ulysses all-to-all). What must be the same draw as in one process stays so: LSH rotations are drawn for
all heads and sliced to the local ones, the LSH op's dropout counters use global head indices, and
dropout masks elsewhere are addressed by global position (and head) (``rng.keep_mask``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


class SequenceShard(ABC):
    """This rank's place in a group of ``size`` ranks that share each sequence, and the exchanges."""

    size: int
    """Ranks sharing one sequence (P)."""
    rank: int
    """This rank's shard: positions [rank*l, (rank+1)*l) and, inside attention, heads [rank*H/P, ...)."""

    def start(self, local_len: int) -> int:
        """Global position of this shard's first position."""
        return self.rank * local_len

    def heads(self, n_heads: int) -> tuple[int, int]:
        """(first, count) of the heads this rank attends over."""
        count = n_heads // self.size
        return self.rank * count, count

    @abstractmethod
    def to_heads(self, x: Tensor) -> Tensor:
        """(B, l, H, D) -> (B, L, H/P, D): all positions of this rank's heads (differentiable). The result is
        a new tensor and the backward needs nothing of x: the reversible stack frees x once exchanged."""

    @abstractmethod
    def to_sequence(self, x: Tensor) -> Tensor:
        """(B, L, H/P, D) -> (B, l, H, D): the inverse of ``to_heads`` (differentiable; a new tensor, the
        backward needs nothing of x or of the result)."""

    @abstractmethod
    def gather(self, x: Tensor) -> Tensor:
        """(B, l, ...) -> (B, L, ...): every shard's slice along dim 1 (not differentiated; masks)."""

    @abstractmethod
    def sum(self, x: Tensor) -> Tensor:
        """A scalar's sum over the shards; its gradient flows into this shard's term only (each rank
        back-propagates its own part, and the data-parallel reduction sums the parts)."""
