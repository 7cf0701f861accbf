"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower, pooled tokens, a Gemma 3 LM whose image
tokens attend to each other both ways.

Each image (and each pan-and-scan crop, which the processor makes an image of its own with its own
markers) is one run of ``mm_tokens_per_image`` placeholders between ``boi_token_id`` and ``eoi_token_id``
(layout tokens): the tower's ``(image_size / patch_size)^2`` patches, average-pooled
``k x k`` (``k = patches per side / tokens per side``) into a ``sqrt(mm_tokens_per_image)`` square grid in
raster order. Which crop belongs to which image is not in the model's inputs (the processor's
``num_crops``), so every crop is an image of the layout.

Inside the LM, the tokens of one image run attend to each other bidirectionally: transformers builds the
mask from ``token_type_ids`` (1 on image tokens; a prompt without them is causal throughout), as
``OR(causal, same image run)`` on the full-attention layers and ``AND(sliding window, OR(causal, same
image run))`` on the sliding-window ones (``config.text_config.layer_types``). The seam passes that mask,
built by transformers' own mask builder for the loaded implementation, to the kernel unchanged, and a
planned row sees what that mask lets it see; a token drop gathers its rows and columns, so kept image
tokens keep seeing each other both ways and the window stays measured in original positions.
FlashAttention drops the bidirectional mask (transformers refuses to load Gemma 3 with it).

The SigLIP tower has no [CLS] token: VisionZip and FasterVLM are refused (:data:`NO_CLS`); PAINT reads the
mean attention each patch receives, pooled as the model pools the patches (:func:`pooled_to_lm`).
"""

from __future__ import annotations

import itertools
import math

import torch

from ..layout import ImageTokens, TokenLayout
from .base import Adapter, sequence_layout, span_of
from .vision import VisionEncoder, block_means, split_images

NO_CLS = ("Gemma 3's SigLIP encoder has no [CLS] token (its pooled patch tokens are all the LM sees): use FastV, "
          "PDrop, SparseVLM or DART there")


def gemma3_layout(model, inputs) -> TokenLayout:
    config = model.config
    side = math.isqrt(config.mm_tokens_per_image)

    def build(sample, run):
        return ImageTokens(positions=run, grid=(side, side), span=span_of(run))

    return sequence_layout(inputs, config.image_token_id, itertools.repeat((side * side, build)),
                           layout_ids=(config.boi_token_id, config.eoi_token_id))


def pooled_to_lm(model, values: torch.Tensor, images) -> list[torch.Tensor]:
    """Per-patch values, image after image -> each image's values on its pooled tokens: the mean over each
    ``k x k`` block of patches, as the projector's average pooling fuses them."""
    config = model.config
    patches = config.vision_config.image_size // config.vision_config.patch_size
    return split_images(block_means(values, patches, patches // math.isqrt(config.mm_tokens_per_image)), images)


ADAPTER = Adapter(
    family="gemma3",
    classes=("Gemma3ForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layers",
    layout=gemma3_layout,
    vision=VisionEncoder(to_lm=pooled_to_lm, no_cls=NO_CLS),
)
