"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, projector, Llama-style LM.

Each image becomes one run of ``image_token_id`` placeholders: (size / patch)^2
tokens in raster order, preceded by the CLS token with the "full" feature strategy
(then a layout token: it has no place on the grid). A processor that letterboxes
(``do_pad``) fills non-square images to a square with its mean colour: the patches
showing only that fill are flagged in the layout (:func:`letterbox_padding`).
The CLIP tower's sequences start with [CLS]; its patches reach the LM in their own order.
"""

from __future__ import annotations

import itertools

import torch

from ..layout import ImageTokens, TokenLayout
from .base import Adapter, UnsupportedModel, sequence_layout, span_of
from .vision import VisionEncoder, same_order


def llava_layout(model, inputs) -> TokenLayout:
    config = model.config
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    cls = int(config.vision_feature_select_strategy == "full")

    def build(sample, run):
        return ImageTokens(positions=run[cls:], grid=(side, side), span=span_of(run), layout=run[:cls])

    return sequence_layout(inputs, config.image_token_id, itertools.repeat((side * side + cls, build)))


def letterbox_padding(pixel_values: torch.Tensor, patch: int, tolerance: float = 0.02) -> torch.Tensor:
    """Which patches of LLaVA-1.5 ``expand2square`` images are padding, ``(images, patches)`` bool.

    The pad colour is the processor's mean colour, i.e. ~0 after normalisation in every
    channel; a patch is padding when more than half of its pixels are.
    """
    pad = pixel_values.abs().amax(1) <= tolerance  # (images, H, W)
    images, height, width = pad.shape
    share = pad.view(images, height // patch, patch, width // patch, patch).float().mean((2, 4))
    return (share > 0.5).flatten(1)


def llava_letterbox(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return letterbox_padding(pixel_values, model.config.vision_config.patch_size)


def clip_cls_layer(model) -> int:
    """The CLIP block whose output the projector reads (``vision_feature_layer`` indexes the tower's hidden
    states, -2: the second-to-last block), when the projector reads one and the LM never sees [CLS]."""
    config = model.config
    if not isinstance(config.vision_feature_layer, int):
        raise UnsupportedModel(f"the projector reads several encoder layers (vision_feature_layer="
                               f"{config.vision_feature_layer}), so no one [CLS] row ranks the LM's visual tokens")
    if config.vision_feature_select_strategy != "default":
        raise UnsupportedModel(f"with vision_feature_select_strategy={config.vision_feature_select_strategy!r} the "
                               "LM sees the [CLS] token too; the [CLS] row ranks the patches only with 'default'")
    return config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1) - 1


CLIP = VisionEncoder(to_lm=same_order, cls=True, cls_layer=clip_cls_layer)
"""LLaVA-1.5's CLIP tower: one sequence per image, [CLS] first."""

ADAPTER = Adapter(
    family="llava",
    classes=("LlavaForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layers",
    layout=llava_layout,
    letterbox=llava_letterbox,
    vision_tower="model.vision_tower",
    vision=CLIP,
)
