"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): anyres-max tiles, unpadding, image newlines,
a SigLIP tower without [CLS], and videos.

How the model packs one image (``LlavaOnevisionModel.pack_image_features``), as LLaVA-NeXT does with two
differences: the base view's ``s x s`` features come first (no newline); the anyres tiles are stitched into one
``(tiles_h * s) x (tiles_w * s)`` grid and cropped back to the image's aspect ratio (``unpad_image``) to
``R0 x C0``; then, "anyres_max_N" (``vision_aspect_ratio``), a grid over ``N`` base views in area
(``sqrt(R0 * C0 / (N * s^2)) > 1.1``) is resized bilinearly to ``R x C = (R0 // ratio, C0 // ratio)``; every
row of it ends with the learned ``image_newline``. An image of a prompt with several images
(``batch_num_images`` > 1) is its base view and one newline. Everything sits on ``image_token_id``
placeholders; the newlines are layout tokens. Under ``generate`` the model gets the packed features instead of
``image_sizes``: the grids are read back from where ``image_newline`` sits, and the tiles the tower ran from the
grid and the tower's tile count (:func:`_packings`).

A video is one run of ``video_token_id`` placeholders: each frame's ``s x s`` features resized bilinearly to
``ceil(s/2) x ceil(s/2)``, frame after frame, then one newline. Each frame is an image of the layout
(``ImageTokens.frame``); the newline is the last frame's layout token.

The tower (SigLIP) has no [CLS] token, so VisionZip and FasterVLM are refused with :data:`NO_CLS`; PAINT reads the
mean attention each patch receives, put on the LM's tokens as the model puts the patches (:func:`onevision_to_lm`:
tiles stitched, cropped and resized; frames resized).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

from ..layout import ImageTokens, SampleLayout, Span, TokenLayout
from .base import Adapter, UnsupportedModel, encoded_images, sequence_layout, span_of
from .vision import VisionEncoder

NO_CLS = ("LLaVA-OneVision's SigLIP encoder has no [CLS] token (the LM sees every patch, "
          "vision_feature_select_strategy='full'): use FastV, PDrop, SparseVLM or DART there")


@dataclass(eq=False)
class AnyresImage(ImageTokens):
    """An image of LLaVA-OneVision: ``packing`` is ``(tiles_h, tiles_w, R0, C0)``, the anyres tiles the tower ran
    and the unpadded grid before its resize to ``tiles[1]``, or None when neither the inputs nor the features say
    it (its encoder values then cannot be placed)."""

    packing: tuple[int, int, int, int] | None = None


def _max_views(config) -> int:
    return int(config.vision_aspect_ratio.strip("anyres_max_"))


def resized(rows: int, cols: int, side: int, views: int) -> tuple[int, int]:
    """The stitched, unpadded ``rows x cols`` grid after anyres-max's resize (unchanged when small enough)."""
    ratio = math.sqrt(rows * cols / (views * side**2))
    return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)


def packing_of(config, image_size) -> tuple[int, int, int, int]:
    """``(tiles_h, tiles_w, R0, C0)`` of an image of ``image_size`` (height, width), as the model computes them."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    tiles_h, tiles_w = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, vision.image_size)
    rows, cols = unpad_image(torch.empty(0, tiles_h * side, tiles_w * side), image_size).shape[1:]
    return tiles_h, tiles_w, rows, cols


def onevision_layout(model, inputs) -> TokenLayout:
    config = model.config
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    sizes = inputs.get("image_sizes")
    if sizes is not None:
        counts = inputs.get("batch_num_images")
        patched = ([n == 1 for n in counts.tolist() for _ in range(n)] if counts is not None
                   else [True] * len(sizes))
        images = (_image(config, packing_of(config, [int(v) for v in size]) if patch else None)
                  for size, patch in zip(sizes, patched))
    else:
        images = iter(_images_from_features(model, inputs))
    layout = sequence_layout(inputs, config.image_token_id, images)
    return _with_videos(layout, inputs, config.video_token_id, math.ceil(side / 2), _frames(inputs))


def _image(config, packing: tuple[int, int, int, int] | None, stitched: tuple[int, int] | None = None):
    """Placeholder count and builder of one image: its packing (None: base view and one newline), or only its
    final stitched grid (read from features; packing then None)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    base = side * side
    if packing is not None:
        stitched = resized(packing[2], packing[3], side, _max_views(config))
    if stitched is None:  # one base view, then one newline
        offsets = torch.arange(base + 1)
        newline, tiles = offsets == base, []
    else:
        rows, cols = stitched
        offsets = torch.arange(base + rows * (cols + 1))
        newline = (offsets >= base) & ((offsets - base) % (cols + 1) == cols)
        tiles = [(side, side), (rows, cols)]

    def build(sample, run):
        return AnyresImage(positions=run[~newline], grid=(side, side), span=span_of(run), tiles=list(tiles),
                           layout=run[newline], packing=packing)

    return len(offsets), build


def _images_from_features(model, inputs) -> list:
    """Each image's placeholder count and builder from its packed features (no ``image_sizes`` under
    ``generate``): the newlines give the final grid; the tiles the tower ran follow from it and the tower's
    tile count where one reading fits (:func:`_packings`)."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    newline = model.model.image_newline
    grids = []
    for feature in encoded_images(inputs):
        is_newline = (feature == newline.to(feature)).all(-1)
        rows = int(is_newline[side * side:].sum())
        if len(feature) == side * side + 1 and is_newline[-1]:
            grids.append(None)
            continue
        cols = (len(feature) - side * side) // max(rows, 1) - 1
        if rows == 0 or len(feature) != side * side + rows * (cols + 1) \
                or not is_newline[side * side + cols::cols + 1].all():
            raise ValueError("vlmtools: LLaVA-OneVision image features are not packed as base view + rows ending in "
                             "image_newline; pass image_sizes")
        grids.append((rows, cols))
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    tiles = getattr(encoded, "last_hidden_state", None)
    packings = _packings(config, grids, None if tiles is None else len(tiles))
    return [_image(config, packing, grid) for packing, grid in zip(packings, grids)]


def _packings(config, grids, tile_count: int | None) -> list:
    """The packing of each image with a stitched grid (None for base-only images): the pinpoints' tile grids and
    unpadded sizes that give its final grid (padding never spans a whole tile); several readings are told apart by
    the tower's tile count over the batch. None where that leaves more than one."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    views = _max_views(config)
    options = []
    for grid in grids:
        if grid is None:
            options.append([None])
            continue
        found = set()
        for height, width in config.image_grid_pinpoints:
            tiles_h, tiles_w = height // vision.image_size, width // vision.image_size
            full_h, full_w = tiles_h * side, tiles_w * side
            unpadded = [(full_h, full_w - 2 * p) for p in range(side // 2 + 1)] + \
                       [(full_h - 2 * p, full_w) for p in range(1, side // 2 + 1)]
            found |= {(tiles_h, tiles_w, r, c) for r, c in unpadded if r > 0 and c > 0 and resized(r, c, side, views) == grid}
        options.append(sorted(found) or [None])
    if all(len(o) == 1 for o in options):
        return [o[0] for o in options]
    if tile_count is None or math.prod(len(o) for o in options) > 4096:
        return [o[0] if len(o) == 1 else None for o in options]
    fits = [combo for combo in itertools.product(*options)
            if sum(1 + (p[0] * p[1] if p else 0) for p in combo) == tile_count]
    if len(fits) != 1:
        return [o[0] if len(o) == 1 else None for o in options]
    return list(fits[0])


def _frames(inputs) -> int | None:
    """Frames per video, from the video inputs or their encoded features (None: read from the runs)."""
    pixels = inputs.get("pixel_values_videos")
    if pixels is not None:
        return pixels.shape[1]
    return None


def _with_videos(layout: TokenLayout, inputs, video_token_id: int, side: int, frames: int | None) -> TokenLayout:
    """``layout`` with each video's frames as images (``frame=(video, index)``, ``side x side`` tokens each) and its
    closing newline as the last frame's layout token; one video per run of ``video_token_id`` (or of
    ``frames * side^2 + 1`` placeholders when the frame count is known)."""
    ids = inputs["input_ids"]
    if not bool((ids == video_token_id).any()):
        return layout
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("video")
    per_video = None if frames is None else frames * side * side + 1
    if per_video is None and encoded is not None:
        per_video = encoded.pooler_output.shape[1]
    samples, video = [], 0
    for row, sample in zip(ids, layout.samples):
        positions = (row == video_token_id).nonzero().squeeze(1)
        runs = _runs(positions) if per_video is None or not positions.numel() else list(positions.split(per_video))
        frames_of = []
        for run in runs:
            count, extra = divmod(len(run) - 1, side * side)
            if extra or count == 0:
                raise ValueError(f"vlmtools: a run of {len(run)} video placeholders is not frames of {side * side} "
                                 "tokens plus one newline: the processor does not match this model")
            for index in range(count):
                tokens = run[index * side * side:(index + 1) * side * side]
                last = run[-1:] if index == count - 1 else run[:0]
                frames_of.append(ImageTokens(positions=tokens, grid=(side, side), span=span_of(tokens), layout=last,
                                             frame=(video, index)))
            video += 1
        images = sorted(sample.images + frames_of, key=lambda image: image.span.start)
        marks = torch.cat([sample.layout] + [f.layout for f in frames_of]).sort().values
        text_start = max([sample.text.start] + [f.span.stop for f in frames_of] + [int(m) + 1 for m in marks[-1:]])
        samples.append(SampleLayout(length=sample.length, images=images, text=Span(text_start, sample.text.stop),
                                    padding=sample.padding, layout=marks, first=sample.first))
    return TokenLayout(samples=samples, seq_len=layout.seq_len, generated_from=layout.generated_from)


def _runs(positions: torch.Tensor) -> list[torch.Tensor]:
    if positions.numel() == 0:
        return []
    breaks = (positions.diff() != 1).nonzero().squeeze(1) + 1
    return list(positions.tensor_split(breaks))


def onevision_to_lm(model, values: torch.Tensor, images) -> list[torch.Tensor]:
    """Per-patch encoder values (every image's tiles, base view first, image after image; then every video's
    frames) -> each image's (and frame's) values in its token order: the base view, then the stitched tiles
    cropped as ``unpad_image`` crops them and resized as the model resizes its features (bilinear); a frame
    resized to its pooled grid."""
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    tiles = values.unflatten(0, (-1, side, side))
    rest = tiles.shape[3:]
    stills = [image for image in images if image.frame is None]
    out, tile = {}, 0
    for image in stills:
        out[id(image)] = [tiles[tile].flatten(0, 1)]
        tile += 1
        if image.tiles:
            packing = getattr(image, "packing", None)
            if packing is None:
                raise UnsupportedModel("vlmtools: which anyres tiles the encoder ran for a LLaVA-OneVision image is "
                                       "not in its features alone (several tilings give its grid); pass image_sizes")
            tiles_h, tiles_w, rows, cols = packing
            stitched = tiles[tile:tile + tiles_h * tiles_w].reshape(tiles_h, tiles_w, side, side, *rest)
            stitched = stitched.transpose(1, 2).reshape(tiles_h * side, tiles_w * side, *rest)
            top, left = (tiles_h * side - rows) // 2, (tiles_w * side - cols) // 2
            grid = stitched[top:top + rows, left:left + cols]
            out[id(image)].append(_resize(grid, image.tiles[1]).flatten(0, 1))
            tile += tiles_h * tiles_w
    for image in (image for image in images if image.frame is not None):
        out[id(image)] = [_resize(tiles[tile], image.grid).flatten(0, 1)]
        tile += 1
    if tile != len(tiles):
        raise ValueError(f"the vision encoder ran {len(tiles)} tiles and frames but the prompt's layout accounts for "
                         f"{tile}")
    return [torch.cat(out[id(image)]) for image in images]


def _resize(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(H, W, ...)`` values resized bilinearly to ``size`` as the model resizes features (identity if equal)."""
    if tuple(grid.shape[:2]) == tuple(size):
        return grid
    flat = grid.reshape(*grid.shape[:2], -1).permute(2, 0, 1)[None].float()
    out = F.interpolate(flat, list(size), mode="bilinear")[0].permute(1, 2, 0)
    return out.reshape(*size, *grid.shape[2:]).to(grid.dtype)


ADAPTER = Adapter(
    family="llava_onevision",
    classes=("LlavaOnevisionForConditionalGeneration",),
    kind="vlm",
    text_layers="model.language_model.layers",
    vision_layers="model.vision_tower.encoder.layers",
    layout=onevision_layout,
    vision=VisionEncoder(to_lm=onevision_to_lm, no_cls=NO_CLS),
)
