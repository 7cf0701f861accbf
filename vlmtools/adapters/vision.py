"""A family's vision encoder as the methods that read inside it see it (VisionZip, FasterVLM, PAINT).

Those methods score the encoder's own tokens and must put each score on the LM visual token the
encoder token becomes: how depends on the family (tiles stitched and cropped, patches merged,
windows reordered), and so does whether a [CLS] token leads each encoder sequence and which block
feeds the projector. The family's adapter says it with a :class:`VisionEncoder`; a method that gets
no answer refuses with the reason the adapter gives (:class:`UnsupportedModel`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..layout import ImageTokens, TokenLayout
from .base import UnsupportedModel

ToLM = Callable[[Any, torch.Tensor, Sequence[ImageTokens]], list[torch.Tensor]]


@dataclass(frozen=True)
class VisionEncoder:
    """What a family's vision encoder is to the methods that read it.

    ``to_lm(model, values, images)``: values ``(tokens, ...)`` of every content token the encoder ran
    in one forward, in the order it ran them ([CLS] rows left out), -> for each of ``images`` (the
    batch's, in :meth:`TokenLayout.images` order) its values in the order of its ``positions``;
    encoder tokens that one LM token fuses are averaged.
    ``cls``: every encoder sequence starts with a [CLS] token (query 0 of each encoder call) that
    the LM does not see as content.
    ``cls_layer(model)``: the encoder block whose [CLS] row ranks the LM's visual tokens, i.e. the one
    block whose output the projector reads; it raises :class:`UnsupportedModel` for a configuration
    it cannot serve. None: there is none, and ``no_cls`` says why and what to use instead.
    """

    to_lm: ToLM
    cls: bool = False
    cls_layer: Callable[[Any], int] | None = None
    no_cls: str = ""

    def cls_block(self, model) -> int:
        """The block index ``cls_layer`` gives, or :class:`UnsupportedModel` with the family's reason."""
        if self.cls_layer is None:
            raise UnsupportedModel(self.no_cls)
        return self.cls_layer(model)


def same_order(model, values: torch.Tensor, images: Sequence[ImageTokens]) -> list[torch.Tensor]:
    """``to_lm`` of a family whose encoder tokens are the LM's visual tokens in the same order (LLaVA-1.5)."""
    return split_images(values, images)


def split_images(values: torch.Tensor, images: Sequence[ImageTokens]) -> list[torch.Tensor]:
    """Values already in LM order, image after image, cut into one tensor per image."""
    counts = [len(image) for image in images]
    if sum(counts) != len(values):
        raise ValueError(f"the vision encoder gave {len(values)} tokens but the prompt's layout places {sum(counts)}")
    return list(values.split(counts))


def join_samples(per_image: Sequence[torch.Tensor], layout: TokenLayout) -> list[torch.Tensor]:
    """Per-image tensors (:meth:`TokenLayout.images` order) joined per sample, in its visual-token order."""
    out, start = [], 0
    for sample in layout.samples:
        stop = start + len(sample.images)
        out.append(torch.cat(list(per_image[start:stop])))
        start = stop
    return out


def block_means(values: torch.Tensor, side: int, block: int) -> torch.Tensor:
    """Values of square ``side x side`` patch grids in raster order, one grid after another, ``(grids * side^2,
    ...)`` -> the mean over each ``block x block`` square, ``(grids * (side / block)^2, ...)`` in raster order: the
    LM tokens of a family that pools (Gemma 3's average pooling) or pixel-shuffles (InternVL, SmolVLM: each LM token
    concatenates such a square) its patches."""
    cells = side // block
    return values.unflatten(0, (-1, cells, block, cells, block)).mean((2, 4)).flatten(0, 2)
