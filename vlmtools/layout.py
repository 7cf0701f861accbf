"""TokenLayout: where each kind of token sits in one real batch.

Positions are sequence indices of the padded batch (left padding shifts them per
sample). Visual tokens are listed in raster order of their image grid, so that
``image.positions.view(*image.grid)`` is the image as the model sees it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Role = Literal["padding", "first", "visual", "layout", "text", "generated"]


@dataclass(frozen=True)
class Span:
    """Half-open range ``[start, stop)`` of sequence positions."""

    start: int
    stop: int

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def indices(self) -> torch.Tensor:
        return torch.arange(self.start, self.stop)


@dataclass
class ImageTokens:
    """One image's content tokens.

    ``grid`` is (rows, cols) of the content tokens in raster order; for Qwen-VL
    ``thw`` is the merged (t, h, w) grid (one ``grid`` per temporal slice). LLaVA-NeXT
    has two grids: ``tiles`` is [base view (h, w), stitched and unpadded anyres tiles
    (R, C)], ``positions`` holds both in that order (split with
    ``positions.split([h * w, R * C])``), ``grid`` is the base view's, and ``layout``
    the R image-newline positions that end the stitched rows (never content).
    ``padding`` flags content tokens that only show letterbox padding (LLaVA-1.5
    ``expand2square``): set from the pixels when the model was wrapped with a processor
    that letterboxes (:meth:`TokenLayout.flag_letterbox`), else None.
    ``frame`` is ``(video, index)`` for one frame of a video (Qwen3-VL, Qwen3.5: each frame is its own run of
    placeholders after its timestamp, ``grid`` its tokens; ``video`` counts the batch's videos), None for an
    image; ``layout`` then holds the timestamp and vision markers between the previous frame and this one.
    """

    positions: torch.Tensor
    grid: tuple[int, int]
    span: Span
    thw: tuple[int, int, int] | None = None
    tiles: list[tuple[int, int]] = field(default_factory=list)
    layout: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    padding: torch.Tensor | None = None
    frame: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.positions.numel()


@dataclass
class SampleLayout:
    """One sample of the batch."""

    length: int
    images: list[ImageTokens]
    text: Span
    padding: torch.Tensor
    layout: torch.Tensor
    first: int

    def visual_positions(self) -> torch.Tensor:
        if not self.images:
            return torch.empty(0, dtype=torch.long)
        return torch.cat([image.positions for image in self.images])

    def roles(self, generated_from: int | None = None) -> list[Role]:
        roles: list[Role] = ["text"] * self.length
        for index in self.padding.tolist():
            roles[index] = "padding"
        for index in self.layout.tolist():
            roles[index] = "layout"
        for index in self.visual_positions().tolist():
            roles[index] = "visual"
        roles[self.first] = "first"
        if generated_from is not None:
            for index in range(generated_from, self.length):
                roles[index] = "generated"
        return roles


@dataclass
class TokenLayout:
    """Per-sample layouts of one batch, plus where generated tokens start."""

    samples: list[SampleLayout]
    seq_len: int
    generated_from: int

    def __len__(self) -> int:
        return len(self.samples)

    def visual_positions(self) -> torch.Tensor:
        """``(B, N)`` visual positions; raises if samples have different counts."""
        per_sample = [s.visual_positions() for s in self.samples]
        counts = {p.numel() for p in per_sample}
        if len(counts) != 1:
            raise ValueError(f"samples have different visual token counts {sorted(counts)}; index per sample")
        return torch.stack(per_sample)

    def images(self) -> list[ImageTokens]:
        """Every image of the batch, sample by sample (the order the model encodes them in)."""
        return [image for sample in self.samples for image in sample.images]

    def flag_letterbox(self, padding: torch.Tensor) -> None:
        """Set each image's ``padding`` from an ``(images, tokens)`` bool mask over :meth:`images`."""
        images = self.images()
        if len(padding) != len(images) or any(len(f) != len(i) for f, i in zip(padding, images)):
            raise ValueError(f"a letterbox mask of shape {tuple(padding.shape)} does not fit the batch's images "
                             f"({[len(i) for i in images]} tokens)")
        for image, flags in zip(images, padding):
            image.padding = flags

    def require_images(self) -> None:
        missing = [i for i, s in enumerate(self.samples) if not s.images]
        if missing:
            raise ValueError(f"no image tokens in sample(s) {missing}: this method needs an image in every prompt")


@dataclass(frozen=True)
class DiTLayout:
    """The joint sequence of a diffusion transformer's attention: one text span, one image grid.

    The same for every sample of the batch. FLUX puts the text first, SD3 the image
    first; ``image.positions.view(*image.grid)`` is the latent grid in raster order.
    """

    text: Span
    image: ImageTokens

    @classmethod
    def of(cls, text_len: int, grid: tuple[int, int], image_first: bool) -> DiTLayout:
        count = grid[0] * grid[1]
        image_start, text_start = (0, count) if image_first else (text_len, 0)
        image = Span(image_start, image_start + count)
        return cls(text=Span(text_start, text_start + text_len),
                   image=ImageTokens(positions=image.indices(), grid=tuple(grid), span=image))
