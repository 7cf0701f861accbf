"""Qwen3-VL MoE (``Qwen3VLMoeForConditionalGeneration``): Qwen3-VL with sparse-MoE feed-forward blocks.

The layout, the vision tower, M-RoPE and DeepStack are Qwen3-VL's (``qwen3_vl.py``); routing is per token,
so dropping tokens changes no other token's experts.
"""
from __future__ import annotations

import dataclasses

from .qwen3_vl import ADAPTER as QWEN3_VL
from .qwen2_vl import no_cls
from .vision import VisionEncoder

ADAPTER = dataclasses.replace(
    QWEN3_VL, family="qwen3_vl_moe", classes=("Qwen3VLMoeForConditionalGeneration",),
    vision=VisionEncoder(to_lm=QWEN3_VL.vision.to_lm, no_cls=no_cls("Qwen3-VL-MoE")))
