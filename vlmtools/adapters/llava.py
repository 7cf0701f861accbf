"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, projector, Llama-style LM.

Each image becomes one run of ``image_token_id`` placeholders: (size / patch)^2
tokens in raster order, preceded by the CLS token with the "full" feature strategy
(then a layout token: it has no place on the grid).
"""

from __future__ import annotations

import itertools

from ..layout import ImageTokens, TokenLayout
from .base import Adapter, sequence_layout, span_of


def llava_layout(model, inputs) -> TokenLayout:
    config = model.config
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    cls = int(config.vision_feature_select_strategy == "full")

    def build(sample, run):
        return ImageTokens(positions=run[cls:], grid=(side, side), span=span_of(run), layout=run[:cls])

    return sequence_layout(inputs, config.image_token_id, itertools.repeat((side * side + cls, build)))


ADAPTER = Adapter(
    family="llava",
    classes=("LlavaForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layers",
    layout=llava_layout,
)
