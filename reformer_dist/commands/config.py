"""Print the resolved run config (defaults < YAML files < key=value overrides).

Examples:
  reformer-dist config --config tiny train.max_steps=50
  reformer-dist config --config base --deepspeed --world-size 8
"""

from __future__ import annotations

import argparse
import sys

from reformer_dist.commands.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--deepspeed", action="store_true",
                        help="print the generated DeepSpeed JSON instead of the run config")
    parser.add_argument("--world-size", type=int, default=1,
                        help="ranks to generate the DeepSpeed batch triple for (default 1); with "
                             "deepspeed.sequence_parallel_size=P they form world/P data-parallel replicas")


def run(args: argparse.Namespace) -> int:
    from reformer_dist.run_config import config_to_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.deepspeed:
        import json

        from reformer_dist.train.deepspeed_config import build_deepspeed_config
        from reformer_dist.train.sequence_parallel import layout_for

        print(json.dumps(build_deepspeed_config(cfg, world_size=args.world_size), indent=2))
        # the layout goes to stderr, so stdout stays the JSON a pipe expects
        layout = layout_for(args.world_size, cfg.deepspeed.sequence_parallel_size)
        print(f"layout: {layout.describe(cfg.train.seq_len, cfg.model.n_heads)}", file=sys.stderr)
    else:
        print(config_to_yaml(cfg), end="")
    return 0
