"""Qwen3.5 MoE (``Qwen3_5MoeForConditionalGeneration``): Qwen3.5's hybrid layers (``qwen3_5.py``) with
sparse-MoE feed-forward blocks; routing is per token, so dropping tokens changes no other token's experts."""
from __future__ import annotations

import dataclasses

from .qwen3_5 import ADAPTER as QWEN3_5, no_cls
from .vision import VisionEncoder

ADAPTER = dataclasses.replace(
    QWEN3_5, family="qwen3_5_moe", classes=("Qwen3_5MoeForConditionalGeneration",),
    vision=VisionEncoder(to_lm=QWEN3_5.vision.to_lm, no_cls=no_cls("Qwen3.5-MoE")))
