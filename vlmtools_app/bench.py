"""What the VLM bench commands (``prune-bench``, ``hallucination-bench``) share: their run options,
loading the model into each process, and the result: a Markdown table printed and one JSON file
holding the settings the run used, the results and how it ran. Sharding: :mod:`vlmtools_app.shard`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import shard
from .args import at_least

NOT_SETTINGS = ("run", "command", "out")
"""Parsed arguments that are not settings of the evaluation (where the result goes)."""


def add_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--model", default="llava-shapes",
                        help="llava-shapes (default) or a local Hugging Face VLM folder")
    parser.add_argument("--batch", type=at_least(1), default=16,
                        help="prompts per generate call, left-padded (a batch is never split across processes)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: every process runs on its own GPU (LOCAL_RANK)")
    parser.add_argument("--threads", type=at_least(1), help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--out", default=out, help="the JSON file written: settings, results, processes, seconds")


def load(args: argparse.Namespace):
    """The wrapped model of ``--model`` on this process's device, with ``--threads`` applied."""
    import torch

    from vlmtools import wrap
    from .inputs import load_vlm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_vlm(args.model)
    return wrap(model.to(shard.device(args.device)), processor)


def finish(args: argparse.Namespace, results: dict, table: str, started: float) -> None:
    """On rank 0: print ``table`` and write ``--out`` (settings, results, processes, seconds)."""
    if not shard.is_main():
        return
    settings = {key: value for key, value in vars(args).items() if key not in NOT_SETTINGS}
    record = {"command": args.command, "settings": settings, "results": results,
              "run": {"processes": shard.world()[1], "seconds": round(time.time() - started, 1)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(table)
    print(f"wrote {args.out}")


def chosen(names: str, available, what: str) -> list[str]:
    """The comma-separated ``names``, each one of ``available`` (else a ValueError listing them)."""
    picked = names.split(",")
    unknown = set(picked) - set(available)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; available: {', '.join(available)}")
    return picked
