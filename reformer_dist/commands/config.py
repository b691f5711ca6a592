"""Print the resolved run config (defaults < YAML files < key=value overrides).

Examples:
  reformer-dist config --config tiny train.max_steps=50
  reformer-dist config --config base --deepspeed --world-size 8
"""

from __future__ import annotations

import argparse

from reformer_dist.commands.common import add_config_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--deepspeed", action="store_true",
                        help="print the generated DeepSpeed JSON instead of the run config")
    parser.add_argument("--world-size", type=int, default=1,
                        help="data-parallel ranks to generate the DeepSpeed batch triple for (default 1)")


def run(args: argparse.Namespace) -> int:
    from reformer_dist.configuration import config_to_yaml, load_config

    cfg = load_config(args.config, args.overrides)
    if args.deepspeed:
        import json

        from reformer_dist.train.deepspeed_config import build_deepspeed_config

        print(json.dumps(build_deepspeed_config(cfg, world_size=args.world_size), indent=2))
    else:
        print(config_to_yaml(cfg), end="")
    return 0
