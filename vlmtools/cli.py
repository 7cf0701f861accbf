"""The ``vlmtools`` command. Each job's subcommands live in its own package.

A package's CLI module defines ``register(subparsers)``, which adds its subcommands
with ``set_defaults(run=function)``; ``function(args)`` does the work.

What a command refuses (a ValueError, an OSError or an ``UnsupportedModel``: a budget above the
visual tokens, a missing file or a folder that is no checkpoint, a model no adapter knows) ends
it with its message and exit status 2, as argparse ends a bad option; ``VLMTOOLS_TRACEBACK=1``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = ("vlmtools.demo", "vlmtools.sinks.command", "pruning.cli", "pruning.bench", "hallucination.bench",
                   "grounding.cli")


def at_least(minimum: int):
    """An argparse ``type``: a whole number no smaller than ``minimum`` (counts of questions, samples, tokens)."""
    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: at least {minimum}")
        return value

    count.__name__ = f"count (at least {minimum})"
    return count


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
    from .adapters import UnsupportedModel

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, OSError, UnsupportedModel) as refusal:
        if os.environ.get("VLMTOOLS_TRACEBACK"):
            raise
        parser.exit(2, f"vlmtools {args.command}: error: {refusal}\n")


if __name__ == "__main__":
    sys.exit(main())
