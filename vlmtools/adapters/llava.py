"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, projector, Llama-style LM.

Each image becomes one run of ``image_token_id`` placeholders: (size / patch)^2
tokens in raster order (plus CLS with the "full" feature strategy).
"""

from __future__ import annotations

import itertools
import math

from ..layout import ImageTokens, TokenLayout
from .base import Adapter, sequence_layout, span_of


def llava_layout(model, inputs) -> TokenLayout:
    config = model.config
    vision = config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        per_image += 1
    side = math.isqrt(per_image)
    grid = (side, per_image // side)

    def build(sample, run):
        return ImageTokens(positions=run, grid=grid, span=span_of(run))

    return sequence_layout(inputs, config.image_token_id, itertools.repeat((per_image, build)))


ADAPTER = Adapter(
    family="llava",
    classes=("LlavaForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layers",
    layout=llava_layout,
)
