"""flux-shapes: a FLUX-architecture DiT trained with flow matching on the world.

- ``transformer``: diffusers' ``FluxTransformer2DModel`` (double- then
  single-stream blocks, 3-axis RoPE, joint text-image attention);
- ``text_encoder``: SmolLM2's first ``TEXT_LAYERS`` layers, frozen, followed by
  its final RMSNorm. Prompts are padded to ``MAX_TOKENS`` with the pad token
  and encoded without a mask, so padding tokens take part in attention as in
  FLUX (T5 padding);
- ``vae``: no learned autoencoder; a fixed, exact 2x pixel-unshuffle of the
  64 px image (``PixelAutoencoder``) gives FLUX-style 12-channel latents at
  32 x 32, packed 2 x 2 into 16 x 16 = 256 image tokens of 48 channels.

``ShapesFluxPipeline`` exposes the pieces of a ``FluxPipeline`` (transformer,
scheduler, text_encoder, tokenizer, vae, ``encode_prompt``, ``_pack_latents``,
``_prepare_latent_image_ids``) so grounding code written for FLUX runs on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .lm import assembled, cache_dir, folder_lock, smollm2_dir, stamp, write_folder

IMAGE_SIZE, MAX_TOKENS, TEXT_LAYERS = 64, 32, 6
LATENT_CHANNELS = 12
WEIGHTS = Path(__file__).parent / "weights" / "flux-shapes"
REFAM_BLOCKS = ("dit.single.0",)
"""The block RefAM and ``zoo.evaluate``'s grounding read on flux-shapes (its source's ``blocks``): the best
one alone on 30 ``val`` expressions with the shipped weights (``benchmarks/grounding_quality.py --sweep-blocks
--sweep-n 30``: mIoU 0.280, against 0.167 for ``dit.single.1`` and at most 0.089 for a double-stream block;
benchmarks/RESULTS.md). It is also RefAM's FLUX default,
which the source states rather than inherits: it was measured, and the default may change."""


DIT_SIZE = (4, 4, 2)
"""The shipped DiT's attention heads (of 32 dims), double-stream and single-stream blocks."""


def transformer_config(heads: int = DIT_SIZE[0], double: int = DIT_SIZE[1], single: int = DIT_SIZE[2]) -> dict:
    """The DiT's config: the shipped size by default, a larger one to train on a GPU
    (``python -m vlmtools_zoo.train flux-shapes --dit HEADS DOUBLE SINGLE``)."""
    return dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=double, num_single_layers=single,
                attention_head_dim=32, num_attention_heads=heads, joint_attention_dim=576,
                pooled_projection_dim=576, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


class PixelAutoencoder:
    """The identity autoencoder up to a 2x pixel-unshuffle: exact, nothing to train."""

    scale_factor = 2

    @staticmethod
    def encode(images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 12, H/2, W/2) in [-1, 1]."""
        return F.pixel_unshuffle(images * 2 - 1, 2)

    @staticmethod
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return (F.pixel_shuffle(latents, 2).clamp(-1, 1) + 1) / 2


TOKEN_PIXELS = 2 * PixelAutoencoder.scale_factor  # a packed token: 2 x 2 latent pixels, 4 x 4 image pixels


def token_share(mask: torch.Tensor) -> torch.Tensor:
    """(H / 4, W / 4): the fraction of each image token's pixels that ``mask`` (H, W) covers."""
    return F.avg_pool2d(mask.float()[None], TOKEN_PIXELS)[0]


def letterbox(scene, size: int = IMAGE_SIZE):
    """(image (3, size, size) in [0, 1], masks (n, size, size)): padded to a square
    with the scene's background colour, then resized."""
    side = max(scene.width, scene.height)
    ox, oy = (side - scene.width) // 2, (side - scene.height) // 2
    img = torch.tensor(scene.bg_colour, dtype=torch.float32).view(3, 1, 1).repeat(1, side, side) / 255
    img[:, oy:oy + scene.height, ox:ox + scene.width] = torch.from_numpy(
        np.array(scene.image)).permute(2, 0, 1).float() / 255
    masks = torch.zeros(len(scene.objects), side, side)
    masks[:, oy:oy + scene.height, ox:ox + scene.width] = torch.from_numpy(scene.masks).float()
    if side != size:
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", antialias=True)[0]
        masks = F.interpolate(masks[None], size=(size, size), mode="bilinear", antialias=True)[0]
    return img, masks > 0.5


class ShapesFluxPipeline:
    """FluxPipeline's pieces, for a model whose text encoder is SmolLM2."""

    def __init__(self, transformer, scheduler, text_encoder, tokenizer):
        self.transformer, self.scheduler = transformer, scheduler
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.vae = PixelAutoencoder()
        self.vae_scale_factor = PixelAutoencoder.scale_factor
        self.tokenizer_max_length = MAX_TOKENS

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to(self, device) -> "ShapesFluxPipeline":
        """Move the transformer and the text encoder (the autoencoder has no weights)."""
        self.transformer.to(device)
        self.text_encoder.to(device)
        return self

    # -- prompts -------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS,
                              truncation=True, return_tensors="pt")["input_ids"]

    @torch.no_grad()
    def encode_prompt(self, prompt, device=None, num_images_per_prompt: int = 1):
        """(prompt_embeds (B, 32, 576), pooled_prompt_embeds (B, 576), text_ids (32, 3)),
        as FluxPipeline.encode_prompt returns them."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        h = self.text_encoder(input_ids=ids).last_hidden_state.float()  # no mask: pads attend
        real = (ids != self.tokenizer.pad_token_id).float()[..., None]
        pooled = (h * real).sum(1) / real.sum(1).clamp(min=1)
        h = h.repeat_interleave(num_images_per_prompt, 0)
        pooled = pooled.repeat_interleave(num_images_per_prompt, 0)
        return h, pooled, torch.zeros(MAX_TOKENS, 3, device=h.device)

    def token_strings(self, prompt: str) -> list[str]:
        """The MAX_TOKENS text tokens the transformer sees, padding included."""
        return self.tokenizer.convert_ids_to_tokens(self.tokenize([prompt])[0].tolist())

    # -- latents -------------------------------------------------------------
    @staticmethod
    def _pack_latents(latents, batch_size, num_channels_latents, height, width):
        latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
        return latents.permute(0, 2, 4, 1, 3, 5).reshape(
            batch_size, (height // 2) * (width // 2), num_channels_latents * 4)

    @staticmethod
    def _unpack_latents(latents, height, width, channels=LATENT_CHANNELS):
        b = latents.shape[0]
        latents = latents.view(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(b, channels, height, width)

    @staticmethod
    def _prepare_latent_image_ids(batch_size, height, width, device=None, dtype=torch.float32):
        ids = torch.zeros(height, width, 3)
        ids[..., 1] += torch.arange(height)[:, None]
        ids[..., 2] += torch.arange(width)[None, :]
        return ids.reshape(height * width, 3).to(device=device, dtype=dtype)

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [0, 1] -> packed clean latents (B, 256, 48)."""
        lat = self.vae.encode(images)
        return self._pack_latents(lat, lat.shape[0], LATENT_CHANNELS, lat.shape[2], lat.shape[3])

    def denoise_input(self, images, t: torch.Tensor, noise: torch.Tensor | None = None,
                      generator: torch.Generator | None = None):
        """Flow matching: x_t = (1 - t) x_0 + t noise (``noise`` or drawn on the CPU with
        ``generator``, so a seed gives the same noise on every device); returns (x_t, velocity target)."""
        x0 = self.image_tokens(images)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        noise = noise.to(x0.device)
        tt = t.to(x0.device).view(-1, 1, 1)
        return (1 - tt) * x0 + tt * noise, noise - x0

    def transformer_inputs(self, x_t, t, prompt_embeds, pooled, text_ids) -> dict:
        """The keyword arguments of one transformer call (image ids for the 64 px grid)."""
        side = IMAGE_SIZE // self.vae_scale_factor // 2
        return dict(hidden_states=x_t, encoder_hidden_states=prompt_embeds, pooled_projections=pooled,
                    timestep=t, img_ids=self._prepare_latent_image_ids(1, side, side, x_t.device), txt_ids=text_ids,
                    return_dict=False)

    def forward(self, x_t, t, prompt_embeds, pooled, text_ids, **kwargs):
        return self.transformer(**self.transformer_inputs(x_t, t, prompt_embeds, pooled, text_ids), **kwargs)[0]

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 20, generator=None):
        """Generate (B, 3, 64, 64) images in [0, 1] with Euler steps of the flow."""
        emb, pooled, txt_ids = self.encode_prompt(prompt)
        side = IMAGE_SIZE // self.vae_scale_factor
        x = torch.randn(emb.shape[0], (side // 2) ** 2, 4 * LATENT_CHANNELS, generator=generator).to(emb.device)
        ts = torch.linspace(1, 0, num_inference_steps + 1, device=emb.device)
        for a, b in zip(ts[:-1], ts[1:]):
            v = self.forward(x, a.expand(x.shape[0]), emb, pooled, txt_ids)
            x = x + (b - a) * v
        return self.vae.decode(self._unpack_latents(x, side, side))

    # -- folders -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import AutoTokenizer, LlamaModel

        folder = Path(folder)
        return cls(FluxTransformer2DModel.from_pretrained(folder / "transformer").eval(),
                   FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
                   LlamaModel.from_pretrained(folder / "text_encoder").eval(),
                   AutoTokenizer.from_pretrained(folder / "tokenizer"))

    def save_pretrained(self, folder):
        folder = Path(folder)
        self.transformer.save_pretrained(folder / "transformer")
        self.scheduler.save_pretrained(folder / "scheduler")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")


def build_text_encoder():
    """SmolLM2's first TEXT_LAYERS layers and its final norm, as a LlamaModel."""
    from transformers import AutoConfig, AutoTokenizer, LlamaModel

    cfg = AutoConfig.from_pretrained(smollm2_dir())
    cfg.num_hidden_layers = TEXT_LAYERS
    enc = LlamaModel.from_pretrained(smollm2_dir(), config=cfg).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    tok.padding_side = "right"
    return enc, tok


def build_pipeline(transformer=None, size: tuple[int, int, int] = DIT_SIZE) -> ShapesFluxPipeline:
    """The pipeline around ``transformer``, else a fresh DiT of ``size`` (``transformer_config``'s)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    enc, tok = build_text_encoder()
    transformer = transformer or FluxTransformer2DModel(**transformer_config(*size))
    return ShapesFluxPipeline(transformer, FlowMatchEulerDiscreteScheduler(shift=1.0), enc, tok)


def load(folder: Path | None = None, weights: Path = WEIGHTS) -> ShapesFluxPipeline:
    """The flux-shapes pipeline, assembled in the cache from SmolLM2 and the shipped DiT
    (or the one in ``weights``, a folder with a ``transformer/`` subfolder)."""
    from diffusers import FluxTransformer2DModel

    folder = folder or cache_dir() / "flux-shapes"
    src = weights / "transformer" / "diffusion_pytorch_model.safetensors"
    config = json.dumps({"transformer": transformer_config(), "text_layers": TEXT_LAYERS}, sort_keys=True)
    with folder_lock(folder):
        if not assembled(folder, made := stamp(src, config)):
            write_folder(folder, made, build_pipeline(FluxTransformer2DModel.from_pretrained(weights / "transformer")))
    return ShapesFluxPipeline.from_pretrained(folder)


from . import refam  # noqa: E402,F401  (imported for its effect:) registers ShapesFluxPipeline's RefAM source with grounding
