"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout and M-RoPE.

Its vision tower differs: blocks not in ``fullatt_block_indexes`` attend within
windows (``cu_window_seqlens``), so those sites fire once per window, and the
tower runs on tokens reordered window by window (``get_vision_window_index``),
not in raster order; the merger's output is put back in raster order, so the
text-side layout is the same as Qwen2-VL's. Encoder values are put back in raster
order the same way (:func:`windowed_to_lm`).
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

from .base import Adapter
from .qwen2_vl import merge_groups, no_cls, qwen_vl_layout
from .vision import VisionEncoder, split_images


def windowed_to_lm(model, values: torch.Tensor, images) -> list[torch.Tensor]:
    """Per-patch values in the tower's window order -> each image's merged tokens in raster order."""
    vision = model.config.vision_config
    merge = vision.spatial_merge_size
    merged = merge_groups(model, values)
    grid = torch.tensor([[t, h * merge, w * merge] for t, h, w in (image.thw for image in images)])
    order, _ = get_vision_window_index(grid, merge, vision.window_size, vision.patch_size)
    return split_images(torch.empty_like(merged).index_copy_(0, order.to(merged.device), merged), images)


ADAPTER = Adapter(
    family="qwen2_5_vl",
    classes=("Qwen2_5_VLForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.visual.blocks",
    vision_attn="attn",
    layout=qwen_vl_layout,
    vision=VisionEncoder(to_lm=windowed_to_lm, no_cls=no_cls("Qwen2.5-VL")),
)
