"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, projector, Llama-style LM.

Each image becomes one run of ``image_token_id`` placeholders: (size / patch)^2
tokens in raster order (plus CLS with the "full" feature strategy).
"""
from __future__ import annotations

import math

import torch

from ..layout import ImageTokens, SampleLayout, Span, TokenLayout
from .base import Adapter


def llava_layout(model, inputs) -> TokenLayout:
    config = model.config
    vision = config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        per_image += 1
    side = math.isqrt(per_image)
    return sequence_layout(inputs, config.image_token_id, lambda run: _split_runs(run, per_image, (side, per_image // side)))


def _split_runs(positions: torch.Tensor, per_image: int, grid) -> list[ImageTokens]:
    if positions.numel() % per_image:
        raise ValueError(f"{positions.numel()} image tokens is not a multiple of {per_image} per image: "
                         "the processor does not match this model")
    return [ImageTokens(positions=chunk, grid=grid, span=Span(int(chunk[0]), int(chunk[-1]) + 1))
            for chunk in positions.split(per_image)]


def sequence_layout(inputs, image_token_id: int, split_images, layout_ids: tuple[int, ...] = ()) -> TokenLayout:
    """Layout of a left- or right-padded batch in which images are placeholder runs.

    ``split_images(positions)`` turns one sample's placeholder positions into its
    images; ``layout_ids`` are token ids that carry no content (e.g. vision start/end).
    """
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    samples = []
    for ids, keep in zip(input_ids, mask):
        real = keep.nonzero().squeeze(1)
        images = split_images((ids == image_token_id).nonzero().squeeze(1))
        layout = torch.isin(ids, torch.tensor(layout_ids, dtype=ids.dtype)).nonzero().squeeze(1)
        content_end = int(real[-1]) + 1 if real.numel() else 0
        text_start = max([image.span.stop for image in images] + [int(layout.max()) + 1 if layout.numel() else 0,
                                                                   int(real[0]) if real.numel() else 0])
        samples.append(SampleLayout(length=ids.numel(), images=images, text=Span(text_start, content_end),
                                    padding=(keep == 0).nonzero().squeeze(1), layout=layout,
                                    first=int(real[0]) if real.numel() else 0))
    return TokenLayout(samples=samples, seq_len=input_ids.shape[1], generated_from=input_ids.shape[1])


ADAPTER = Adapter(
    family="llava",
    classes=("LlavaForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layers",
    layout=llava_layout,
)
