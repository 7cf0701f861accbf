"""Timing helpers shared by the benchmarks: ratios against a baseline in one process."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def ratios(baseline: Callable[[], object], variants: dict[str, Callable[[], object]], repeats: int = 7,
           warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> tuple[float, dict[str, float]]:
    """Median baseline seconds and, per variant, the median of per-round time ratios.

    ``clock=time.process_time`` counts this process's CPU seconds instead of wall time:
    on a machine shared with other jobs it is far less noisy (but hides idle waits).

    Rounds interleave baseline and variants so that machine noise hits both alike.
    """
    with torch.inference_mode():
        for _ in range(warmup):
            baseline()
            for fn in variants.values():
                fn()
        base_times, per_variant = [], {name: [] for name in variants}
        for _ in range(repeats):
            base = timed(baseline, clock)
            base_times.append(base)
            for name, fn in variants.items():
                per_variant[name].append(timed(fn, clock) / base)
    return statistics.median(base_times), {name: statistics.median(r) for name, r in per_variant.items()}


def write_section(path, heading: str, text: str) -> None:
    """Replace the ``## {heading}`` section of a Markdown file with ``text`` (or append it), leaving the rest."""
    from pathlib import Path

    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results"]
    out, skipping = [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() == f"## {heading}"
        if not skipping:
            out.append(line)
    path.write_text("\n".join(out).rstrip() + "\n\n" + text.rstrip() + "\n")
