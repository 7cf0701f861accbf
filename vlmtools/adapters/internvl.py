"""InternVL (``InternVLForConditionalGeneration``): InternViT tower with a [CLS] token, pixel shuffle, tiles
plus a thumbnail.

The processor cuts an image into ``n`` tiles of ``image_size`` (a grid chosen from its aspect ratio; with
more than one, a thumbnail of the whole image last) and writes ``<img>`` + ``n * t`` ``image_token_id``
placeholders + ``</img>``. Each tile is one encoder sequence ([CLS] first); the projector reads
``vision_feature_layer`` without the [CLS] row, and the pixel shuffle (``downsample_ratio``, 0.5) makes each
``2 x 2`` square of patches one LM token: ``t = (image_size / patch_size * downsample_ratio)^2`` tokens per tile
in raster order. The tile grid the processor chose (and so which tile is where in the image) is not in the
model's inputs (its ``num_patches`` only counts them), so every tile is an image of the layout, in the order the
model reads them; the markers around each image's run (``<img>``, ``</img>``: the processor writes them, the
config does not name them) are layout tokens.

VisionZip and FasterVLM read the [CLS] row of each tile at the block the projector reads
(:func:`~vlmtools.adapters.llava.clip_cls_layer`: ``vision_feature_layer``, -1 for InternVL 2.5 / 3: the last
block) and rank that tile's patches; encoder values reach the LM as the mean of each pixel-shuffle square
(:func:`shuffled_to_lm`).
"""

from __future__ import annotations

import torch

from ..layout import ImageTokens, SampleLayout, Span, TokenLayout
from .base import Adapter, span_of
from .llava import clip_cls_layer
from .vision import VisionEncoder, block_means, split_images


def _sides(model) -> tuple[int, int]:
    """(patches per side of a tile, pixel-shuffle square side)."""
    vision = model.config.vision_config
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    return size // patch, round(1 / model.config.downsample_ratio)


def internvl_layout(model, inputs) -> TokenLayout:
    patches, block = _sides(model)
    side = patches // block
    return tile_layout(inputs, model.config.image_token_id, side, markers=True)


def tile_layout(inputs, image_token_id: int, side: int, markers: bool) -> TokenLayout:
    """Layout of a batch whose images are runs of ``side x side`` tiles: each tile an image; with ``markers``, the
    token before and after each run of placeholders is a layout token."""
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    samples = []
    for ids, keep in zip(input_ids, mask):
        real = keep.nonzero().squeeze(1)
        first = int(real[0]) if real.numel() else 0
        positions = ids.eq(image_token_id).nonzero().squeeze(1)
        if positions.numel() % (side * side):
            raise ValueError(f"{positions.numel()} image placeholders in a prompt do not split into tiles of "
                             f"{side * side} tokens: the processor (or image inputs) do not match this model")
        images = [ImageTokens(positions=tile, grid=(side, side), span=span_of(tile))
                  for tile in positions.split(side * side)]
        layout = []
        if markers and positions.numel():
            breaks = (positions.diff() != 1).nonzero().squeeze(1) + 1
            for run in positions.tensor_split(breaks):
                layout += [p for p in (int(run[0]) - 1, int(run[-1]) + 1) if first <= p < len(ids)]
        layout = torch.tensor(sorted(set(layout)), dtype=torch.long)
        end = int(real[-1]) + 1 if real.numel() else 0
        text_start = max([image.span.stop for image in images] + [int(layout.max()) + 1 if layout.numel() else 0,
                                                                   first])
        samples.append(SampleLayout(length=ids.numel(), images=images, text=Span(text_start, end),
                                    padding=(keep == 0).nonzero().squeeze(1), layout=layout, first=first))
    return TokenLayout(samples=samples, seq_len=input_ids.shape[1], generated_from=input_ids.shape[1])


def shuffled_to_lm(model, values: torch.Tensor, images) -> list[torch.Tensor]:
    """Per-patch values of every tile ([CLS] rows left out), tile after tile -> each tile's values on its LM tokens:
    the mean over each pixel-shuffle square."""
    patches, block = _sides(model)
    return split_images(block_means(values, patches, block), images)


ADAPTER = Adapter(
    family="internvl",
    classes=("InternVLForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layer",
    vision_attn="attention",
    layout=internvl_layout,
    vision=VisionEncoder(to_lm=shuffled_to_lm, cls=True, cls_layer=clip_cls_layer),
)
