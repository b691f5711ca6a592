"""Predict the peak memory per rank of a training run, and the longest train.seq_len that fits.

Examples:
  reformer-dist plan --config base --world-size 8
  reformer-dist plan --config base --world-size 8 deepspeed.sequence_parallel_size=8 --seq-len 1048576
  reformer-dist plan --config base --world-size 8 deepspeed.sequence_parallel_size=8 --memory-gib 80 --device cuda

Parameters, gradients and optimizer states follow the ZeRO stage; activations follow the reversible
stack's tiles (see reformer_dist/train/memory_plan.py); on CPU the process's own memory is added.
"""

from __future__ import annotations

import argparse

from reformer_dist.commands.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, default=1, help="ranks of the launch (default 1)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="plan train.seq_len=N, growing the model's positional table when it is shorter")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="memory per rank: also print the longest train.seq_len that fits in it")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu adds the process's resident memory; cuda counts tensors (default cpu)")


def run(args: argparse.Namespace) -> int:
    from reformer_dist.errors import ConfigError
    from reformer_dist.run_config import load_config
    from reformer_dist.train.memory_plan import longest_seq_len, plan_memory, with_seq_len
    from reformer_dist.train.sequence_parallel import layout_for

    if args.memory_gib is not None and not args.memory_gib > 0:
        raise ConfigError("--memory-gib", f"must be > 0, got {args.memory_gib}")
    cfg = load_config(args.config, args.overrides)
    if args.seq_len is not None:
        cfg = with_seq_len(cfg, args.seq_len)
        cfg.validate()  # the new length against the chunk length and the sequence-parallel size
    layout = layout_for(args.world_size, cfg.deepspeed.sequence_parallel_size)
    plan = plan_memory(cfg, args.world_size, args.device)
    print(f"layout: {layout.describe(cfg.train.seq_len, cfg.model.n_heads)}")
    print(f"ZeRO-{cfg.deepspeed.zero_stage}, {cfg.deepspeed.precision}, micro-batch {cfg.train.micro_batch_size}, "
          f"seq_len {cfg.train.seq_len:,}, device {args.device}: predicted memory per rank")
    print(plan.table())
    if args.memory_gib is not None:
        best = longest_seq_len(cfg, args.world_size, args.memory_gib, args.device)
        if best is None:
            print(f"longest train.seq_len within {args.memory_gib:g} GiB per rank: none (the model states alone "
                  f"do not fit)")
        else:
            print(f"longest train.seq_len within {args.memory_gib:g} GiB per rank: {best:,}")
    return 0
