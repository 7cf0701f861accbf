"""What a DiT family gives readers of its attention on real inputs (RefAM): a source.

A source turns a real image and prompt into one transformer call, each step done by the
pipeline's own public pieces so that the numbers are the pipeline's: the clean latents of
the image (its VAE), the prompt's text features (``encode_prompt``), what each text
position stands for (its tokenizers, with character offsets), and the keyword arguments
of one call at flow-matching time ``t``. Where the text encoder reads the prompt inside a chat
template (FLUX.2, Qwen-Image), each position's span is found in the templated text and re-expressed
in the prompt; the template's own tokens get empty spans (:func:`chat_segment`). A bare transformer
has no VAE or text encoder: its source only builds calls, from latents and text features the caller encoded. Each
family's module names its sources in ``DiTAdapter.sources`` (``flux.py``, ``sd3.py``).

A video DiT's source (Mochi, Wan) says how many video frames its VAE folds into one latent
frame (``temporal``; the first frame is a latent frame of its own), and its latents are a
whole clip: grid ``(frames, rows, cols)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class Segment:
    """One tokenizer's stretch of the text sequence: per position its character span in
    the prompt and whether it is a real token (the tokenizer's attention mask)."""

    offsets: Sequence[tuple[int, int]]
    real: Sequence[int]


@dataclass
class EncodedPrompt:
    """Text features of one prompt as the transformer takes them, and the token segments they stand for."""

    embeds: torch.Tensor  # (1, T, D)
    pooled: torch.Tensor | None  # (1, P); None where the family takes no pooled features (FLUX.2, Qwen-Image, video)
    segments: list[Segment]
    text_ids: torch.Tensor | None = None  # FLUX only: (T, 3)


class Source:
    """A bare transformer: builds calls; encoding images and prompts needs a pipeline."""

    family = ""
    multiple = 1  # image sides must be multiples of this
    blocks: tuple[str, ...] | None = None
    """Sites read by default on this source's model (a family's rule, or blocks measured best on it);
    None: the reader's own default."""
    temporal: int | None = None
    """A video DiT's VAE: video frames per latent frame after the first (Mochi 6, Wan 4); None: images."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    def check_image(self, image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"RefAM: the image must be a PIL image, got {type(image).__name__}; "
                "use PIL.Image.fromarray(array) for an (H, W, 3) uint8 array"
            )
        if image.mode != "RGB":
            raise ValueError(f"RefAM: the image is in mode {image.mode!r}; convert it with image.convert('RGB')")
        width, height = image.size
        if width % self.multiple or height % self.multiple:
            raise ValueError(
                f"RefAM: {self.family} needs image sides that are multiples of {self.multiple}, got "
                f"{width}x{height}; resize to e.g. {_round(width, self.multiple)}x"
                f"{_round(height, self.multiple)} (image.resize) and resize the mask back"
            )
        return image

    def transformer_at(self, t: float) -> torch.nn.Module:
        """The transformer the pipeline runs at flow time ``t``: one for most families; a pipeline with experts
        over time (Wan 2.2: a low-noise expert below a boundary) names the one that denoises at ``t``."""
        return self.transformer

    def latents(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        raise TypeError(
            "RefAM: a bare transformer has no VAE; pass its pipeline, or encode the image yourself and "
            "call RefAM.segment_encoded(latents, grid, prompt, expression)"
        )

    def clip_latents(self, frames: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Clean latents of a clip and their grid ``(frames, rows, cols)`` (video DiTs' pipelines)."""
        if self.temporal is None:
            raise TypeError(f"RefAM: {self.family} is an image DiT; segment a video frame by frame "
                            "(grounding.refam.video.segment_video does)")
        raise TypeError(
            "RefAM: a bare transformer has no VAE; pass its pipeline, or encode the clip yourself and "
            "call RefAM.segment_clip_encoded(latents, grid, prompt, expression)"
        )

    def latent_frame(self, frame: int) -> int:
        """The latent frame that holds video frame ``frame`` (the first alone, then ``temporal`` per latent frame)."""
        return 0 if frame == 0 or self.temporal is None else (frame - 1) // self.temporal + 1

    def check_clip(self, frames: Sequence[Image.Image]) -> list[Image.Image]:
        """Each frame checked as an image; all of one size, as many as the VAE folds whole."""
        frames = [self.check_image(frame) for frame in frames]
        if not frames:
            raise ValueError("RefAM: the clip has no frames")
        if len({frame.size for frame in frames}) > 1:
            raise ValueError(f"RefAM: the frames differ in size ({sorted({f.size for f in frames})}); resize them alike")
        if self.temporal and (len(frames) - 1) % self.temporal:
            whole = (len(frames) - 1) // self.temporal * self.temporal + 1
            raise ValueError(f"RefAM: {self.family}'s VAE takes 1 + {self.temporal} k frames, got {len(frames)}; "
                             f"use the first {whole} (or pad with copies of the last frame)")
        return frames

    def prompt(self, text: str) -> EncodedPrompt:
        raise TypeError(
            "RefAM: a bare transformer has no tokenizer or text encoder; pass its pipeline, or call "
            "RefAM.segment_encoded with an EncodedPrompt"
        )

    def call(self, x_t: torch.Tensor, t: float, prompt: EncodedPrompt, grid: tuple[int, int]) -> dict:
        raise NotImplementedError

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.transformer.device, dtype=self.transformer.dtype)


def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """The pipelines' own latent normalisation of a VAE's posterior mode (SD3/FLUX VAEs have a shift)."""
    latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def token_segment(tokenizer, text: str, max_length: int) -> Segment:
    """The positions ``tokenizer`` gives ``text`` as the pipeline pads it; refuses truncation."""
    full = tokenizer(text)["input_ids"]
    if len(full) > max_length:
        raise ValueError(
            f"RefAM: the prompt {text!r} takes {len(full)} tokens, more than the {max_length} the "
            "text encoder sees; shorten the expression or use fewer magnets"
        )
    enc = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_offsets_mapping=True)
    return Segment([tuple(o) for o in enc["offset_mapping"]], list(enc["attention_mask"]))


def chat_segment(offsets, real, templated: str, prompt: str) -> Segment:
    """The positions of ``templated`` (a chat template's text around ``prompt``, the user turn) re-expressed in
    ``prompt``: ``offsets`` are the tokenizer's character spans in ``templated`` and ``real`` its attention mask,
    as the pipeline tokenizes it. A token within the prompt keeps its span there (clipped to it); a template
    token gets an empty span, which RefAM reads as a special token."""
    start = templated.rfind(prompt)
    if start < 0:
        raise ValueError(f"RefAM: the chat template does not hold the prompt {prompt!r} verbatim; "
                         "the expression's tokens cannot be located")
    stop = start + len(prompt)
    spans = []
    for (first, last), is_real in zip(offsets, real):
        first, last = max(int(first), start), min(int(last), stop)
        spans.append((first - start, last - start) if is_real and first < last else (0, 0))
    return Segment(spans, [int(r) for r in real])


def normalised_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """``(z - latents_mean) / latents_std`` per channel of ``(B, C, F, h, w)`` latents: the Wan and Qwen-Image
    VAEs' normalisation, as their pipelines apply it to encoded images."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    return (latents - mean) / std


def _round(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)
