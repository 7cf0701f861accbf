"""flux-shapes for RefAM: its source (registered with grounding when the zoo is imported, with the blocks
measured best on ``val``) and the held-out referring expressions of the world as RefAM samples."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from grounding.refam.evaluate import Sample
from grounding.refam.source import register_source
from vlmtools.adapters.dit_source import EncodedPrompt, token_segment
from vlmtools.adapters.flux import FluxTransformerSource

from . import world
from .flux import IMAGE_SIZE, REFAM_BLOCKS, letterbox


class ZooFluxSource(FluxTransformerSource):
    """The zoo's ``flux-shapes``: 64 x 64 RGB images, SmolLM2 prompts padded to 32 without a mask."""

    def __init__(self, pipe):
        super().__init__(pipe.transformer)
        self.pipe, self.blocks = pipe, REFAM_BLOCKS

    def check_image(self, image):
        image = super().check_image(image)
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"RefAM: flux-shapes was trained on {IMAGE_SIZE}x{IMAGE_SIZE} images, got "
                f"{image.size[0]}x{image.size[1]}; letterbox and resize it first "
                "(vlmtools_zoo.flux.letterbox does this for world scenes)"
            )
        return image

    def latents(self, image):
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        tokens = self.pipe.image_tokens(pixels)
        side = int(tokens.shape[1] ** 0.5)
        return tokens, (side, side)

    def prompt(self, text):
        embeds, pooled, text_ids = self.pipe.encode_prompt(text)
        return EncodedPrompt(
            embeds, pooled, [token_segment(self.pipe.tokenizer, text, self.pipe.tokenizer_max_length)], text_ids
        )


def zoo_samples(n: int, split: str = "test", start: int = 0) -> list[Sample]:
    """The first ``n`` referring expressions of held-out world scenes, letterboxed to 64 x 64 as flux-shapes sees them."""
    samples, index = [], start
    while len(samples) < n:
        scene = world.scene(split, index)
        pixels, masks = letterbox(scene)
        image = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        samples += [Sample(image, ref.text, masks[ref.target].numpy()) for ref in scene.referring_expressions()]
        index += 1
    return samples[:n]


register_source("ShapesFluxPipeline", lambda pipe, **options: ZooFluxSource(pipe))
