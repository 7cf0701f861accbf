"""The ``vlmtools`` command. Each job's subcommands live in its own package.

A package's CLI module defines ``register(subparsers)``, which adds its subcommands
with ``set_defaults(run=function)``; ``function(args)`` does the work.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ("vlmtools.demo", "vlmtools.sinks.command", "pruning.cli", "pruning.bench", "hallucination.bench",
                   "grounding.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmtools",
        description="Attention-sink tools for VLMs and diffusion transformers. Every command runs on the "
                    "embedded zoo models by default; --model PATH takes a local Hugging Face folder.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
