"""Resumable checkpoints, one-line logs and the autocast policy shared by the zoo's trainers."""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from .lm import cache_dir


class Checkpoint:
    """``<cache>/train/<model>/<stage>.pt``: the step reached and the state of named parts."""

    def __init__(self, model: str, stage: str):
        self.stage = stage
        self.path = cache_dir() / "train" / model / f"{stage}.pt"

    def load(self, parts: dict) -> int:
        if not self.path.exists():
            return 0
        state = torch.load(self.path, weights_only=False)
        for name, part in parts.items():
            part.load_state_dict(state[name])
        log("resume", state["step"], 0.0, path=str(self.path))
        return state["step"]

    def save(self, step: int, parts: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"step": step, **{k: v.state_dict() for k, v in parts.items()}}, tmp)
        os.replace(tmp, self.path)


def schedule_end(step: int, steps: int, restarts: tuple[int, ...] = ()) -> int:
    """The step the learning-rate schedule decays toward at ``step``: the first warm restart
    after ``step`` (below ``steps``), else ``steps``. A run with a restart at r follows the
    schedule of a run to r resumed to ``steps``, as some shipped stages were trained
    (docs/zoo.md), so one call reproduces them."""
    return next((r for r in sorted(restarts) if step < r < steps), steps)


def log(stage: str, step: int, elapsed: float, **values) -> None:
    vals = {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}
    print(json.dumps({"t": time.strftime("%H:%M:%S"), "stage": stage, "step": step,
                      "s": round(elapsed, 1), **vals}), flush=True, file=sys.stdout)


def autocast():
    """bf16 autocast where the CPU computes bf16 natively (AVX512-BF16 or AMX), else plain fp32:
    emulated bf16 is ten times slower than fp32 (an llava-shapes align step on an AVX2-only
    EPYC core: 266 s in bf16, 25.5 s in fp32)."""
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=native)
