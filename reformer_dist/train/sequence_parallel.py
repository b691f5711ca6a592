"""Sequence parallelism (DeepSpeed-Ulysses) for training: process groups, the model's exchanges, the layout.

``deepspeed.sequence_parallel_size`` = P > 1 splits the ranks into groups of P consecutive ranks that share
every sample (DeepSpeed's ``parallel_state_sp``: ranks [i*P, (i+1)*P) form group i); the groups are the
data-parallel replicas. Rank r of a group holds positions [r*L/P, (r+1)*L/P) of each sequence.

- The model gets a :class:`UlyssesShard` (``ReformerLM.shard_sequence``): its all-to-alls are DeepSpeed's
  ``_SeqAllToAll`` (the building block of ``deepspeed.sequence.layer.DistributedAttention``), its loss sum is
  DeepSpeed's sequence-parallel sum (``deepspeed.sequence.cross_entropy._global_sp_sum``: every rank sees
  the group's total, the gradient flows through its own part).
- The engine gets ``parallel_state_sp`` as its ``mpu``: ZeRO partitions and reduces over all ranks, and
  gradients are summed within a group and averaged over groups (DeepSpeed divides by world/P), which is
  the gradient of the mean loss over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from reformer_dist.errors import ConfigError
from reformer_dist.model.sequence_parallel import SequenceShard

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """How ``world_size`` ranks divide into sequence-parallel groups (consecutive ranks per group)."""

    world_size: int
    sequence_parallel_size: int

    @property
    def data_parallel_size(self) -> int:
        """Replicas: the number of sequence-parallel groups (each takes its own samples)."""
        return self.world_size // self.sequence_parallel_size

    def data_parallel_rank(self, rank: int) -> int:
        return rank // self.sequence_parallel_size

    def sequence_parallel_rank(self, rank: int) -> int:
        return rank % self.sequence_parallel_size

    def describe(self, seq_len: int, n_heads: int) -> str:
        """One line for people: the groups and what each rank holds."""
        p = self.sequence_parallel_size
        if p == 1:
            return (f"{self.world_size} rank(s), data parallel: each rank holds whole sequences of {seq_len:,} "
                    f"positions")
        groups = [list(range(g * p, (g + 1) * p)) for g in range(self.data_parallel_size)]
        shown = ", ".join(str(g) for g in groups[:4]) + (", ..." if len(groups) > 4 else "")
        return (f"{self.world_size} ranks = {self.data_parallel_size} data-parallel x {p} sequence-parallel "
                f"(groups {shown}): each rank holds {seq_len // p:,} of {seq_len:,} positions and, inside "
                f"attention, {n_heads // p} of {n_heads} heads over the whole sequence")


def layout_for(world_size: int, sequence_parallel_size: int) -> Layout:
    """The layout of ``world_size`` ranks; ConfigError naming the key when P does not divide them.
    (Heads and sequence length against P are checked with the run config, ``JobConfig.validate``.)"""
    if world_size % sequence_parallel_size:
        raise ConfigError("deepspeed.sequence_parallel_size", f"{sequence_parallel_size} does not divide the "
                                                              f"{world_size} ranks of this launch into whole groups")
    return Layout(world_size, sequence_parallel_size)


class UlyssesShard(SequenceShard):
    """The model's exchanges over one sequence-parallel process group, on DeepSpeed's primitives."""

    def __init__(self, group) -> None:
        import deepspeed.comm as dist

        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def to_heads(self, x: Tensor) -> Tensor:
        from deepspeed.sequence.layer import _SeqAllToAll

        # scatter the head dim (2), gather the sequence dim (1) of (B, l, H, D)
        return _SeqAllToAll.apply(self.group, x, 2, 1, 0)

    def to_sequence(self, x: Tensor) -> Tensor:
        from deepspeed.sequence.layer import _SeqAllToAll

        # scatter the sequence dim (1), gather the head dim (2) of (B, L, H/P, D)
        return _SeqAllToAll.apply(self.group, x, 1, 2, 0)

    def gather(self, x: Tensor) -> Tensor:
        import deepspeed.comm as dist
        import torch

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def sum(self, x: Tensor) -> Tensor:
        from deepspeed.sequence.cross_entropy import _global_sp_sum

        return _global_sp_sum(x, self.group)


class SequenceParallelGroups:
    """DeepSpeed's ``parallel_state_sp`` as the engine's ``mpu``, plus a tensor-parallel degree of 1.

    DeepSpeed 0.19.8 asks an mpu for its tensor-parallel size when it records a checkpoint's parallel
    layout and when it loads a universal checkpoint; ``parallel_state_sp`` has no such method, so DeepSpeed
    falls back to its model-parallel size, which that module aliases to the sequence-parallel size: the
    checkpoint then claims P model files where there is one, and ``ds_to_universal`` refuses it. There is
    no tensor parallelism here, so the answer is 1; everything else is ``parallel_state_sp``'s.
    """

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)

    @staticmethod
    def get_tensor_model_parallel_world_size() -> int:
        return 1


def initialize(sequence_parallel_size: int) -> tuple[SequenceParallelGroups | None, UlyssesShard | None]:
    """Form the sequence-parallel groups (after the process group exists): returns the ``mpu`` for
    ``deepspeed.initialize`` and this rank's shard, or (None, None) when P = 1."""
    if sequence_parallel_size == 1:
        return None, None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size)
    return SequenceParallelGroups(parallel_state_sp), UlyssesShard(parallel_state_sp.get_sequence_parallel_group())
