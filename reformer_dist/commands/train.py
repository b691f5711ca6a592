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

from reformer_dist.commands.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from reformer_dist.configuration import load_config
    from reformer_dist.train.trainer import train

    return train(load_config(args.config, args.overrides))
