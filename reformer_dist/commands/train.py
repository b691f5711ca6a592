"""Train (or resume) a Reformer LM with DeepSpeed; run one process per rank through a launcher.

Examples:
  deepspeed --num_gpus 8 --module reformer_dist train --config base train.max_steps=1000
  deepspeed --num_gpus 2 --module reformer_dist train --config tiny     # CPU: 2 gloo ranks
  torchrun --nproc_per_node 8 -m reformer_dist train --config base
  reformer-dist train --config tiny                                     # one process

The run directory (train.output_dir) gets config.yaml, ds_config.json, metrics.jsonl, checkpoints/, the
`latest` pointer and, at the end, native/ (consolidated fp32 weights for export and serving).
train.resume=auto (default) continues from `latest`; SIGTERM/SIGUSR1 checkpoint and exit 0.
"""

from __future__ import annotations

import argparse
import os

from reformer_dist.commands.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    # Host memory on transparent huge pages (torch's switch, for allocations of 2 MiB and more): a long
    # training step allocates and frees gigabytes of activations, and glibc hands every block above 32 MiB
    # back to the kernel when it is freed, so the next step faults it in again: one fault per 2 MiB instead
    # of per 4 KiB. torch reads the switch at its first allocation, so it is set before torch is imported;
    # THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from reformer_dist.run_config import load_config
    from reformer_dist.train.trainer import train

    return train(load_config(args.config, args.overrides))
