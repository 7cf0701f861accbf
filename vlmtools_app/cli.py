"""The ``vlmtools`` command. Each job's subcommands live in their own module of this package.

A command module defines ``register(subparsers)``, which adds its subcommands with
``set_defaults(run=function)``; ``function(args)`` does the work. ``COMMANDS`` lists them
in the order ``vlmtools --help`` shows them.

What a command refuses (a ValueError, an OSError or an ``UnsupportedModel``: a budget above the
visual tokens, a missing file or a folder that is no checkpoint, a model no adapter knows) ends
it with its message and exit status 2, as argparse ends a bad option; ``VLMTOOLS_TRACEBACK=1``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import demo, hallucination_bench, prune, prune_bench, segment, sinks, tune

COMMANDS = (demo, sinks, prune, prune_bench, hallucination_bench, segment, tune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmtools",
        description="Attention-sink tools for VLMs and diffusion transformers. Every command runs on the "
                    "embedded zoo models by default; --model PATH takes a local Hugging Face folder.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vlmtools.adapters import UnsupportedModel

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
