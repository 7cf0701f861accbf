"""Sources: how a pipeline turns a real image and a prompt into one transformer call.

RefAM needs four things from a pipeline, each done by the pipeline's own public
pieces so that the numbers are the pipeline's: the clean latents of the image (its
VAE), the prompt's text features
(``encode_prompt``), what each text position stands for (its tokenizers, with
character offsets), and the keyword arguments of one transformer call at
flow-matching time ``t``. A bare transformer has no VAE or text encoder: its source
only builds calls, from latents and text features the caller encoded
(:meth:`RefAM.segment_encoded`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from vlmtools.adapters import UnsupportedModel

from .prompt import Segment


@dataclass
class EncodedPrompt:
    """Text features of one prompt as the transformer takes them, and the token segments they stand for."""

    embeds: torch.Tensor  # (1, T, D)
    pooled: torch.Tensor  # (1, P)
    segments: list[Segment]
    text_ids: torch.Tensor | None = None  # FLUX only: (T, 3)


class Source:
    """A bare transformer: builds calls; encoding images and prompts needs a pipeline."""

    family = ""
    multiple = 1  # image sides must be multiples of this
    blocks: tuple[str, ...] | None = None
    """Blocks measured best for this source's model; None: RefAM's per-family ``default_blocks``."""

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

    def latents(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        raise TypeError(
            "RefAM: a bare transformer has no VAE; pass its pipeline, or encode the image yourself and "
            "call RefAM.segment_encoded(latents, grid, prompt, expression)"
        )

    def prompt(self, text: str) -> EncodedPrompt:
        raise TypeError(
            "RefAM: a bare transformer has no tokenizer or text encoder; pass its pipeline, or call "
            "RefAM.segment_encoded with an EncodedPrompt"
        )

    def call(self, x_t: torch.Tensor, t: float, prompt: EncodedPrompt, grid: tuple[int, int]) -> dict:
        raise NotImplementedError

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.transformer.device, dtype=self.transformer.dtype)


class FluxTransformerSource(Source):
    """FLUX calls: packed latents, (0, row, col) image ids, timestep = t, guidance when embedded."""

    family = "flux"

    def __init__(self, transformer, guidance: float = 3.5):
        super().__init__(transformer)
        self.guidance = guidance

    def call(self, x_t, t, prompt, grid):
        from diffusers import FluxPipeline

        x_t, batch = self._tensor(x_t), x_t.shape[0]
        ids = FluxPipeline._prepare_latent_image_ids(batch, *grid, x_t.device, x_t.dtype)
        text_ids = prompt.text_ids if prompt.text_ids is not None else x_t.new_zeros(prompt.embeds.shape[1], 3)
        kwargs = {
            "hidden_states": x_t,
            "encoder_hidden_states": self._tensor(prompt.embeds),
            "pooled_projections": self._tensor(prompt.pooled),
            "timestep": x_t.new_full((batch,), t),
            "img_ids": ids,
            "txt_ids": text_ids.to(x_t.device),
            "return_dict": False,
        }
        if self.transformer.config.guidance_embeds:
            kwargs["guidance"] = x_t.new_full((batch,), self.guidance)
        return kwargs


class SD3TransformerSource(Source):
    """SD3 calls: (B, C, h, w) latents, timestep = 1000 t (the scheduler's sigmas x 1000)."""

    family = "sd3"

    def call(self, x_t, t, prompt, grid):
        x_t, batch = self._tensor(x_t), x_t.shape[0]
        return {
            "hidden_states": x_t,
            "encoder_hidden_states": self._tensor(prompt.embeds),
            "pooled_projections": self._tensor(prompt.pooled),
            "timestep": x_t.new_full((batch,), 1000.0 * t),
            "return_dict": False,
        }


class FluxSource(FluxTransformerSource):
    """A diffusers ``FluxPipeline``: its VAE, CLIP (pooled) and T5 (sequence, padded to 512, no mask)."""

    def __init__(self, pipe, guidance: float = 3.5, max_sequence_length: int = 512):
        super().__init__(pipe.transformer, guidance)
        self.pipe, self.max_length = pipe, max_sequence_length
        self.multiple = pipe.vae_scale_factor * 2

    def latents(self, image):
        latents = _vae_latents(self.pipe.vae, self.pipe.image_processor.preprocess(image))
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width), (height // 2, width // 2)

    def prompt(self, text):
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=text, prompt_2=None, max_sequence_length=self.max_length
        )
        segment = token_segment(self.pipe.tokenizer_2, text, self.max_length)
        return EncodedPrompt(embeds, pooled, [segment], text_ids)


class SD3Source(SD3TransformerSource):
    """A diffusers ``StableDiffusion3Pipeline``: CLIP-L/G tokens (77) then T5 tokens (zeros without T5)."""

    def __init__(self, pipe, max_sequence_length: int = 256):
        super().__init__(pipe.transformer)
        self.pipe, self.max_length = pipe, max_sequence_length
        self.multiple = pipe.vae_scale_factor * pipe.patch_size

    def latents(self, image):
        latents = _vae_latents(self.pipe.vae, self.pipe.image_processor.preprocess(image))
        patch = self.pipe.patch_size
        return latents, (latents.shape[2] // patch, latents.shape[3] // patch)

    def prompt(self, text):
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=text,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_length,
        )
        segments = [token_segment(self.pipe.tokenizer, text, self.pipe.tokenizer_max_length)]
        if self.pipe.text_encoder_3 is None:  # the pipeline feeds zeros there: nothing real
            segments.append(Segment([(0, 0)] * self.max_length, [0] * self.max_length))
        else:
            segments.append(token_segment(self.pipe.tokenizer_3, text, self.max_length))
        return EncodedPrompt(embeds, pooled, segments)


def _vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
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


SOURCES: dict[str, Callable[..., Source]] = {}
"""Class name (of a pipeline or a bare transformer) -> its source factory ``(model, **options)``."""


def register_source(class_name: str, factory: Callable[..., Source]) -> None:
    """Make RefAM read models of ``class_name`` (or a subclass) through ``factory(model, **options)``."""
    SOURCES[class_name] = factory


def source_for(model, **options) -> Source:
    """The source registered for ``model``'s class or its nearest base; ``UnsupportedModel`` for anything else."""
    for cls in type(model).__mro__:
        if cls.__name__ in SOURCES:
            return SOURCES[cls.__name__](model, **options)
    raise UnsupportedModel(
        f"RefAM: unsupported model {type(model).__name__}; RefAM reads the joint attention of "
        f"{', '.join(sorted(SOURCES))}; register another with grounding.refam.register_source"
    )


for _name, _factory in {"FluxPipeline": FluxSource, "StableDiffusion3Pipeline": SD3Source,
                        "FluxTransformer2DModel": FluxTransformerSource,
                        "SD3Transformer2DModel": SD3TransformerSource}.items():
    register_source(_name, _factory)


def _round(value: int, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)
