"""Process-group setup: which rank am I, which backend, which device.

Every launcher hands a rank its coordinates in environment variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT): the ``deepspeed`` launcher and ``torchrun`` set them, and the SLURM template
(``launch/slurm.sbatch``) maps ``srun``'s SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS onto them. A bare
``python -m reformer_dist train`` is a world of one on a free loopback port.

Collectives get a timeout (``deepspeed.collective_timeout_s``): a peer that died mid-collective makes the
others raise instead of waiting forever, so a job with a dead rank ends non-zero and can be restarted.
gloo notices a closed peer socket at once; NCCL's watchdog aborts after the timeout.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from reformer_dist.errors import ConfigError
from reformer_dist.train import shm_comm


@dataclass(frozen=True)
class DistInfo:
    rank: int
    """Global rank in [0, world_size)."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    world_size: int
    """Number of data-parallel ranks."""
    device: torch.device
    """cuda:<local_rank> when CUDA is available, else cpu."""
    backend: str
    """nccl on GPU, gloo on CPU."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_from_env(env: dict[str, str] | os._Environ) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from a launcher's environment, (0, 0, 1) when there is none."""
    if "RANK" not in env:
        return 0, 0, 1
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as e:
        raise ConfigError("RANK/WORLD_SIZE", f"the launcher environment is incomplete or malformed: {e}") from None
    if not 0 <= rank < world:
        raise ConfigError("RANK", f"{rank} is not in [0, WORLD_SIZE={world})")
    return rank, local, world


def init_distributed(timeout_s: float) -> DistInfo:
    """Join (or, alone, create) the process group; returns this rank's coordinates."""
    import deepspeed

    rank, local_rank, world_size = rank_from_env(os.environ)
    if "RANK" not in os.environ:  # a world of one still needs a rendezvous address for the process group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    with shm_comm.housekeeping(rank, local_rank):  # CPU: DeepSpeed's comm-op build lock, its /dev/shm segments
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                   verbose=False)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def all_gather_float(value: float, device: torch.device) -> list[float]:
    """``value`` from every rank, in rank order."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(x.item()) for x in out]


def barrier() -> None:
    dist.barrier()


def shutdown() -> None:
    """Leave the process group once every rank is done with it: a gloo rank that tears down its connections
    while a peer still uses them can abort the peer at exit (SIGABRT, seen ~1 run in 10 on CPU)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
