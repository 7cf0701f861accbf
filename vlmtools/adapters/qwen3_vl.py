"""Qwen3-VL (``Qwen3VLForConditionalGeneration``; the MoE class in ``qwen3_vl_moe.py``).

Images are Qwen2-VL's: one run of ``image_token_id`` placeholders between ``vision_start_token_id`` and
``vision_end_token_id`` per image, ``(h/m) x (w/m)`` merged tokens in raster order. A video becomes one
run per frame (temporal patch) of ``video_token_id`` placeholders, each frame wrapped in vision start /
end and preceded by its timestamp as text (``<0.5 seconds>``): each frame is one :class:`ImageTokens`
with ``frame=(video, index)``, and the timestamp and markers between two frames are layout tokens (the
first frame's timestamp is read as text: nothing in the ids marks where it starts).

The LM's rotary positions are interleaved M-RoPE (temporal, height, width rows; a frame's temporal row
is its start); the decoder layers get the text row as ``position_ids`` and the rotary tables already
computed. DeepStack: the vision tower also merges the outputs of its ``deepstack_visual_indexes`` blocks,
and the LM adds the i-th of those to the visual tokens' hidden states after decoder layer i, inside
``Qwen3VLTextModel``'s layer loop (``_deepstack_process(hidden, visual_pos_masks, embeds)``), not in any
layer: the adapter names it as a :class:`ResidualAdd`, so a token drop before or among those layers adds
the features of the kept visual tokens only.

Vision tower: no [CLS]; each image (and each video frame) is its own attention sequence (``cu_seqlens``:
a vision site fires once per image or frame); patches come grouped by merge group, as Qwen2-VL's. The
tower encodes a batch's images first, then its videos (``generate`` does the same), whatever their order
in the prompts: :func:`frames_last_to_lm` puts encoder values back in the layout's order.
"""
from __future__ import annotations

import itertools

import torch

from ..layout import ImageTokens, TokenLayout
from .base import Adapter, ResidualAdd, encoded_images, sequence_layout, span_of
from .qwen2_vl import _image, _images_from_rope, merge_groups, no_cls
from .vision import VisionEncoder, split_images


def qwen3_vl_layout(model, inputs) -> TokenLayout:
    """Images and video frames of a batch from ``image_grid_thw`` / ``video_grid_thw``, or under ``generate``
    (which hands the model encoder outputs instead) from the encoded features and the M-RoPE ids."""
    config = model.config
    merge = config.vision_config.spatial_merge_size
    grids = inputs.get("image_grid_thw")
    images = (_image(t, h // merge, w // merge) for t, h, w in grids.tolist()) if grids is not None \
        else _images_from_rope(inputs)
    numbers = itertools.count()
    video_grids = inputs.get("video_grid_thw")
    if video_grids is not None:
        videos = (_video(t, h // merge, w // merge, numbers) for t, h, w in video_grids.tolist())
    else:
        videos = _videos_from_rope(inputs, numbers)
    return sequence_layout(inputs, config.image_token_id, images,
                           layout_ids=(config.vision_start_token_id, config.vision_end_token_id),
                           videos=(config.video_token_id, videos))


def _video(t: int, h: int, w: int, numbers):
    def build(sample, run):
        return _frames(run, [(h, w)] * t, next(numbers))

    return t * h * w, build


def _frames(run: torch.Tensor, grids: list[tuple[int, int]], video: int) -> list[ImageTokens]:
    """One video's placeholder positions cut into its frames, each a run of its own."""
    frames, start = [], 0
    for index, (h, w) in enumerate(grids):
        positions = run[start:start + h * w]
        start += h * w
        if int(positions[-1] - positions[0]) + 1 != len(positions):
            raise ValueError(f"frame {index} of a video is not one run of {h * w} placeholders: the processor (or "
                             "video inputs) do not match this model")
        between = torch.arange(int(frames[-1].span.stop), int(positions[0])) if frames else torch.empty(0, dtype=torch.long)
        frames.append(ImageTokens(positions=positions, grid=(h, w), span=span_of(positions), thw=(1, h, w),
                                  layout=between, frame=(video, index)))
    return frames


def _videos_from_rope(inputs, numbers):
    """Videos under ``generate``: their token counts from the encoder outputs, each frame's merged grid from the
    height and width rows of its M-RoPE ids (every frame is a run of its own)."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
    if encoded is None:
        return iter(())
    rope = inputs.get("position_ids")
    if rope is None or rope.dim() != 3:
        raise ValueError("vlmtools: the Qwen3-VL layout of a video needs video_grid_thw (or the M-RoPE position_ids)")
    rope = rope[-3:]

    def build(sample, run):
        breaks = (run.diff() > 1).nonzero().squeeze(1) + 1
        grids = []
        for segment in torch.tensor_split(run, breaks):
            _, rows, cols = rope[:, sample, segment]
            grids.append((int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1))
        return _frames(run, grids, next(numbers))

    return ((len(feature), build) for feature in encoded.pooler_output)


def frames_last_to_lm(model, values: torch.Tensor, images) -> list[torch.Tensor]:
    """Per-patch values as the tower ran them (the batch's images, then its video frames) -> each image's and
    frame's merged tokens, in the layout's order."""
    order = [i for i, image in enumerate(images) if image.frame is None] + \
            [i for i, image in enumerate(images) if image.frame is not None]
    parts = split_images(merge_groups(model, values), [images[i] for i in order])
    out: list[torch.Tensor] = [None] * len(images)  # type: ignore[list-item]
    for index, part in zip(order, parts):
        out[index] = part
    return out


ADAPTER = Adapter(
    family="qwen3_vl",
    classes=("Qwen3VLForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.visual.blocks",
    vision_attn="attn",
    layout=qwen3_vl_layout,
    vision=VisionEncoder(to_lm=frames_last_to_lm, no_cls=no_cls("Qwen3-VL")),
    residual_adds=(ResidualAdd("model.language_model", "_deepstack_process"),),
)
