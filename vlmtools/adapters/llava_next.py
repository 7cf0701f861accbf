"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres tiles and image newlines.

How the model packs one image (``LlavaNextModel.pack_image_features``): the base
(resized whole-image) view's ``h x w`` features come first, no newline; then the
anyres tiles are stitched into one ``(tiles_h * h) x (tiles_w * w)`` grid, cropped
back to the image's aspect ratio (``unpad_image``) to ``R x C``, and every one of its
``R`` rows is followed by the learned ``image_newline`` vector. All of these sit on
``image_token_id`` placeholders: ``h*w + R*(C+1)`` per image, which depends on the
image size (``image_sizes``, (height, width)), as the processor computes it.
Under ``generate`` the model gets the packed features instead of ``image_sizes``;
the grids are then read back from where ``image_newline`` sits in them.
The CLIP tower encodes the base view and each tile as its own sequence ([CLS] first):
:func:`tiles_to_lm` puts per-tile values where the packing puts the tiles' features.
"""

from __future__ import annotations

import math

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from ..layout import ImageTokens, TokenLayout
from .base import Adapter, encoded_images, sequence_layout, span_of
from .llava import clip_cls_layer
from .vision import VisionEncoder


def anyres_grids(config, image_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """(base h, w) and stitched, unpadded (R, C) feature grids of one image, as the model computes them."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    rows, cols = unpad_image(torch.empty(0, tiles_h * side, tiles_w * side), image_size).shape[1:]
    return (side, side), (rows, cols)


def llava_next_layout(model, inputs) -> TokenLayout:
    sizes = inputs.get("image_sizes")
    if sizes is not None:
        images = (_image(*anyres_grids(model.config, [int(v) for v in size])) for size in sizes)
    else:
        images = (_image_from_features(model, feature) for feature in encoded_images(inputs))
    return sequence_layout(inputs, model.config.image_token_id, images)


def _image(base: tuple[int, int], stitched: tuple[int, int]):
    """Placeholder count and builder of one image with these grids."""
    base_count = base[0] * base[1]
    rows, cols = stitched
    offsets = torch.arange(base_count + rows * (cols + 1))
    newline = (offsets >= base_count) & ((offsets - base_count) % (cols + 1) == cols)

    def build(sample, run):
        return ImageTokens(
            positions=run[~newline], grid=base, span=span_of(run), tiles=[base, stitched], layout=run[newline]
        )

    return len(offsets), build


def _image_from_features(model, feature: torch.Tensor):
    """Grids of one packed image read back from its features (no ``image_sizes`` under ``generate``)."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    is_newline = (feature == model.model.image_newline.to(feature)).all(-1)
    rows = int(is_newline.sum())
    cols = (len(feature) - side * side) // max(rows, 1) - 1
    count, build = _image((side, side), (rows, cols))
    if count != len(feature) or not is_newline[side * side + cols :: cols + 1].all():
        raise ValueError(
            "vlmtools: LLaVA-NeXT image features are not packed as base grid + rows ending in "
            "image_newline; pass image_sizes"
        )
    return count, build


def tiles_to_lm(model, values: torch.Tensor, images) -> list[torch.Tensor]:
    """Per-tile encoder values (base view, then the anyres tiles, image after image) -> each image's values
    in its token order: the base grid, then the stitched tiles cropped as ``unpad_image`` crops them."""
    vision = model.config.vision_config
    tiles = values.unflatten(0, (-1, (vision.image_size // vision.patch_size) ** 2))
    rest, out, tile = tiles.shape[2:], [], 0
    for image in images:
        (height, width), (rows, cols) = image.tiles
        grid_h, grid_w = math.ceil(rows / height), math.ceil(cols / width)
        stitched = tiles[tile + 1:tile + 1 + grid_h * grid_w]
        stitched = stitched.reshape(grid_h, grid_w, height, width, *rest).transpose(1, 2)
        stitched = stitched.reshape(grid_h * height, grid_w * width, *rest)
        top, left = (grid_h * height - rows) // 2, (grid_w * width - cols) // 2
        out.append(torch.cat([tiles[tile], stitched[top:top + rows, left:left + cols].flatten(0, 1)]))
        tile += 1 + grid_h * grid_w
    if tile != len(tiles):
        raise ValueError(f"the vision encoder saw {len(tiles)} tiles but the prompt's layout accounts for {tile}; "
                         "an image's anyres padding may span a whole tile")
    return out


ADAPTER = Adapter(
    family="llava_next",
    classes=("LlavaNextForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layers",
    layout=llava_next_layout,
    vision=VisionEncoder(to_lm=tiles_to_lm, cls=True, cls_layer=clip_cls_layer),
)
