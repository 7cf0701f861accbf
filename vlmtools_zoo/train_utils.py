"""Resumable checkpoints, one-line logs, the training device and the autocast policy shared by the
zoo's trainers."""
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
        state = torch.load(self.path, map_location="cpu", weights_only=True)  # tensors and plain data only; load_state_dict moves it
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
    (docs/zoo-history.md), so one call reproduces them."""
    return next((r for r in sorted(restarts) if step < r < steps), steps)


def log(stage: str, step: int, elapsed: float, **values) -> None:
    vals = {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}
    print(json.dumps({"t": time.strftime("%H:%M:%S"), "stage": stage, "step": step,
                      "s": round(elapsed, 1), **vals}), flush=True, file=sys.stdout)


def training_device(name: str | None = None) -> torch.device:
    """``name`` ("cpu", "cuda:1", ...), else the first GPU where there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s parameters are: the trainers move each batch to its model's device."""
    return next(module.parameters()).device


def autocast(device: torch.device | str = "cpu"):
    """bf16 autocast on a GPU that computes bf16, and on a CPU that does so natively (AVX512-BF16
    or AMX); else plain fp32: emulated bf16 is ten times slower than fp32 (an llava-shapes align
    step on an AVX2-only EPYC core: 266 s in bf16, 25.5 s in fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_bf16_supported())
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=native)
