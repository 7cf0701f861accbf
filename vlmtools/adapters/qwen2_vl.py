"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): native-resolution ViT, M-RoPE LM.

Each image is one run of ``image_token_id`` placeholders between
``vision_start_token_id`` and ``vision_end_token_id`` (layout tokens): its
``image_grid_thw`` row (t, h, w) counts patches before the ``spatial_merge_size``
merge, so the run holds ``t * (h/m) * (w/m)`` tokens in raster order, one
``(h/m) x (w/m)`` grid per temporal slice.

Vision tower: ``model.visual.blocks[i].attn`` attends within each image only; with
any kernel but flash-attention it calls the attention function once per image
(``cu_seqlens`` chunks, batch 1, no mask), so a vision site fires, and records,
once per image per forward. Text positions are 3-row M-RoPE ids (temporal, height,
width), built by ``model.model.get_rope_index(input_ids, mm_token_type_ids,
image_grid_thw, attention_mask=...)``; during generation the per-sample offset
to the plain 1-D position lives in ``model.model.rope_deltas`` (anything that
drops tokens must keep both consistent).
The tower has no [CLS] token; its merger fuses each ``m x m`` group of consecutive patches
into one LM token.
"""

from __future__ import annotations

import torch

from ..layout import ImageTokens, TokenLayout
from .base import Adapter, encoded_images, sequence_layout, span_of
from .vision import VisionEncoder, split_images


def qwen_vl_layout(model, inputs) -> TokenLayout:
    config = model.config
    if inputs.get("video_grid_thw") is not None or (inputs.get("mm_encoder_outputs") or {}).get("video") is not None:
        raise NotImplementedError("vlmtools: Qwen-VL video inputs have no layout yet; pass images only")
    merge = config.vision_config.spatial_merge_size
    grids = inputs.get("image_grid_thw")
    if grids is not None:
        images = (_image(t, h // merge, w // merge) for t, h, w in grids.tolist())
    else:
        images = _images_from_rope(inputs)
    return sequence_layout(
        inputs, config.image_token_id, images, layout_ids=(config.vision_start_token_id, config.vision_end_token_id)
    )


def _image(t: int, h: int, w: int):
    def build(sample, run):
        return ImageTokens(positions=run, grid=(h, w), span=span_of(run), thw=(t, h, w))

    return t * h * w, build


def _images_from_rope(inputs):
    """Merged grids read from the M-RoPE ids (no ``image_grid_thw`` under ``generate``).

    ``generate`` passes ``position_ids`` of shape (4, B, L): the plain text positions,
    then the (temporal, height, width) rows; an image's height/width rows count up
    from the same start over its grid.
    """
    rope = inputs.get("position_ids")
    if rope is None or rope.dim() != 3:
        raise ValueError("vlmtools: Qwen-VL layout needs image_grid_thw (or the M-RoPE position_ids)")
    rope = rope[-3:]

    def build(sample, run):
        _, rows, cols = rope[:, sample, run]
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        return _image(len(run) // (h * w), h, w)[1](sample, run)

    return ((len(feature), build) for feature in encoded_images(inputs))


def merge_groups(model, values: torch.Tensor) -> torch.Tensor:
    """Per-patch values in the tower's order -> one mean per merge group (one LM token each)."""
    return values.unflatten(0, (-1, model.config.vision_config.spatial_merge_size ** 2)).mean(1)


def merged_to_lm(model, values: torch.Tensor, images) -> list[torch.Tensor]:
    return split_images(merge_groups(model, values), images)


def no_cls(name: str) -> str:
    return f"{name}'s vision encoder has no [CLS] token: use FastV, PDrop, SparseVLM or DART there"


ADAPTER = Adapter(
    family="qwen2_vl",
    classes=("Qwen2VLForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.visual.blocks",
    vision_attn="attn",
    layout=qwen_vl_layout,
    vision=VisionEncoder(to_lm=merged_to_lm, no_cls=no_cls("Qwen2-VL")),
)
