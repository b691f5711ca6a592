"""`reformer-dist` command line: one subcommand per module in :mod:`reformer_dist.commands`.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and imports its heavy
dependencies (torch, deepspeed, onnxruntime...) inside ``run``, so ``reformer-dist --help`` stays fast.
User errors (:class:`ReformerDistError`) are printed as one line and exit with status 2 (a message that
quotes a library's multi-line text is joined onto that line).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reformer_dist.errors import ReformerDistError

# (subcommand, module under reformer_dist.commands) — a command is listed once it works.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("config", "config"),
    ("prepare-data", "prepare_data"),
    ("train", "train"),
    ("eval", "eval"),
    ("serve", "serve"),
    ("export", "export"),
    ("convert", "convert"),
    ("generate", "generate"),
    ("plan", "plan"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reformer-dist",
        description="Train Reformer LMs with DeepSpeed; export them to ONNX Runtime / TensorRT; serve them.",
    )
    # The deepspeed launcher calls `python -m reformer_dist --local_rank=N train ...`; the rank also
    # reaches the process as $LOCAL_RANK, which is what the training code reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS:
        module = importlib.import_module(f"reformer_dist.commands.{module_name}")
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ReformerDistError as e:
        print(f"reformer-dist {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
