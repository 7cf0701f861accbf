"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout and M-RoPE.

Its vision tower differs: blocks not in ``fullatt_block_indexes`` attend within
windows (``cu_window_seqlens``), so those sites fire once per window, and the
tower runs on tokens reordered window by window (``get_vision_window_index``),
not in raster order; the merger's output is put back in raster order, so the
text-side layout is the same as Qwen2-VL's.
"""

from __future__ import annotations

from .base import Adapter
from .qwen2_vl import qwen_vl_layout

ADAPTER = Adapter(
    family="qwen2_5_vl",
    classes=("Qwen2_5_VLForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.visual.blocks",
    vision_attn="attn",
    layout=qwen_vl_layout,
)
