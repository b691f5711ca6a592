"""Arguments shared by the subcommands that take a run config."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE...` (merged in order; bare names are looked up in configs/) and `key=value` overrides."""
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                        help="YAML config (repeatable, merged in order); a bare name like 'tiny' means "
                             "configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides, e.g. train.max_steps=100 model.n_layers=4")
