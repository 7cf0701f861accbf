"""Tiny random-weight diffusion transformers of the real diffusers classes, with inputs.

Each builder returns ``(model, inputs)``: an fp32 model in eval mode and keyword
inputs for a batch of two on a 3 x 4 latent grid (non-square, so that a swapped
rows/cols shows), with ``TEXT`` text tokens; the video DiTs (Mochi, Wan) have ``FRAMES``
latent frames of that grid. Builders seed torch.
"""
from __future__ import annotations

import torch
from diffusers import (
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    MochiTransformer3DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

TEXT = 5
GRID = (3, 4)


def tiny_flux(grid: tuple[int, int] = GRID, text: int = TEXT, heads: int = 2, head_dim: int = 16, double: int = 2,
              single: int = 2, context_dim: int = 32):
    """FLUX: ``double`` double-stream and ``single`` single-stream blocks, rotary over (1, row, col) ids."""
    torch.manual_seed(0)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=double, num_single_layers=single,
                                   attention_head_dim=head_dim, num_attention_heads=heads,
                                   joint_attention_dim=context_dim, pooled_projection_dim=16,
                                   axes_dims_rope=rope).eval()
    rows, cols = grid
    inputs = {
        "hidden_states": torch.randn(2, rows * cols, 8),
        "encoder_hidden_states": torch.randn(2, text, context_dim),
        "pooled_projections": torch.randn(2, 16),
        "timestep": torch.tensor([0.5, 0.7]),
        # the pipeline's own ids: (0, row, col) per latent token in raster order
        "img_ids": FluxPipeline._prepare_latent_image_ids(2, rows, cols, "cpu", torch.float32),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }
    return model, inputs


def tiny_sd3(grid: tuple[int, int] = GRID, text: int = TEXT):
    """SD3.5-style: 3 joint blocks (the last context_pre_only), dual attention in block 0, RMS qk-norm."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                  dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    rows, cols = grid
    inputs = {
        "hidden_states": torch.randn(2, 4, 2 * rows, 2 * cols),
        "encoder_hidden_states": torch.randn(2, text, 32),
        "pooled_projections": torch.randn(2, 16),
        "timestep": torch.tensor([500.0, 700.0]),
        "return_dict": False,
    }
    return model, inputs


def tiny_flux2(grid: tuple[int, int] = GRID, text: int = TEXT, heads: int = 2, head_dim: int = 16, double: int = 2,
               single: int = 2, context_dim: int = 32, guidance: bool = True):
    """FLUX.2: ``double`` double-stream and ``single`` parallel single-stream blocks, rotary over (t, row, col, l)
    ids as its pipelines make them."""
    from vlmtools.adapters.flux2 import latent_ids, text_ids

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=double, num_single_layers=single,
                                    attention_head_dim=head_dim, num_attention_heads=heads,
                                    joint_attention_dim=context_dim, timestep_guidance_channels=16,
                                    axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=guidance).eval()
    rows, cols = grid
    inputs = {
        "hidden_states": torch.randn(2, rows * cols, 8),
        "encoder_hidden_states": torch.randn(2, text, context_dim),
        "timestep": torch.tensor([0.5, 0.7]),
        "img_ids": latent_ids(2, grid),
        "txt_ids": text_ids(2, text),
        "return_dict": False,
    }
    if guidance:
        inputs["guidance"] = torch.tensor([4.0, 4.0])
    return model, inputs


def tiny_qwen_image(grid: tuple[int, int] = GRID, text: int = TEXT, layers: int = 2):
    """Qwen-Image: ``layers`` dual-stream blocks, RMS qk-norm, rotary over (frame, row, col); the second
    sample's prompt has two padding tokens (``encoder_hidden_states_mask``)."""
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=layers,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        axes_dims_rope=(4, 6, 6)).eval()
    rows, cols = grid
    mask = torch.ones(2, text, dtype=torch.long)
    mask[1, -2:] = 0
    inputs = {
        "hidden_states": torch.randn(2, rows * cols, 16),
        "encoder_hidden_states": torch.randn(2, text, 32),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.5, 0.7]),
        "img_shapes": [[(1, rows, cols)]] * 2,
        "return_dict": False,
    }
    return model, inputs


FRAMES = 2


def tiny_mochi(grid: tuple[int, int] = GRID, text: int = TEXT, frames: int = FRAMES, layers: int = 2):
    """Mochi: ``layers`` joint blocks (the last ``context_pre_only``) over ``frames`` latent frames of a
    ``grid`` after 2 x 2 patches, video first; the second sample's prompt has two padding tokens."""
    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=layers,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                    max_sequence_length=text).eval()
    with torch.no_grad():  # released weights are not zero: give the rotary frequencies values
        model.pos_frequencies.normal_(0, 0.05)
    rows, cols = grid
    mask = torch.ones(2, text, dtype=torch.bool)
    mask[1, -2:] = False
    inputs = {
        "hidden_states": torch.randn(2, 4, frames, 2 * rows, 2 * cols),
        "encoder_hidden_states": torch.randn(2, text, 32),
        "encoder_attention_mask": mask,
        "timestep": torch.tensor([500.0, 700.0]),
        "return_dict": False,
    }
    return model, inputs


def tiny_wan(grid: tuple[int, int] = GRID, text: int = TEXT, frames: int = FRAMES, layers: int = 2,
             image: bool = False):
    """Wan: ``layers`` blocks of self-attention over ``frames`` latent frames (1 x 2 x 2 patches) and
    cross-attention to the text; ``image=True`` is the image-to-video variant (CLIP image features through
    added keys; its processor takes the last 512 context tokens as text, so ``text`` is then 512)."""
    torch.manual_seed(0)
    extra = {"image_dim": 16, "added_kv_proj_dim": 24} if image else {}
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=32, **extra).eval()
    text = 512 if image else text
    rows, cols = grid
    inputs = {
        "hidden_states": torch.randn(2, 4, frames, 2 * rows, 2 * cols),
        "encoder_hidden_states": torch.randn(2, text, 32),
        "timestep": torch.tensor([500.0, 700.0]),
        "return_dict": False,
    }
    if image:
        inputs["encoder_hidden_states_image"] = torch.randn(2, 7, 16)
    return model, inputs


PUBLISHED = {
    "flux": "FLUX.1 [dev]: 24 heads x 128, T5 4096, CLIP 768",
    "flux2": "FLUX.2 [klein] 4B: 24 heads x 128, Qwen3 features 7680",
    "qwen_image": "Qwen-Image: 24 heads x 128, Qwen2.5-VL features 3584",
    "sd3": "SD3.5 Large: 38 heads x 64, T5 4096, CLIP 2048",
    "mochi": "Mochi 1: 24 heads x 128, text stream 1536, T5 4096",
    "wan": "Wan 2.1 14B: 40 heads x 128, FFN 13824, T5 4096",
}
"""The published checkpoint each family's :func:`published_dit` takes its widths from."""


def published_dit(family: str, grid: tuple[int, int] = (4, 6), text: int = 16, frames: int = FRAMES):
    """``(model, inputs)``: ``family`` at its published block width (``PUBLISHED``), random weights, fp32, one block
    (one double- and one single-stream block for FLUX and FLUX.2; two for Mochi, whose last block is
    ``context_pre_only``), on a reduced latent ``grid`` (``frames`` latent frames for the video DiTs) with
    ``text`` tokens of the published text width; a batch of two (the second prompt with two pads where the family
    takes a text mask)."""
    torch.manual_seed(0)
    rows, cols = grid
    if family == "flux":
        model = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=1, guidance_embeds=True).eval()
        inputs = {"hidden_states": torch.randn(2, rows * cols, 64), "encoder_hidden_states": torch.randn(2, text, 4096),
                  "pooled_projections": torch.randn(2, 768), "timestep": torch.tensor([0.5, 0.7]),
                  "guidance": torch.tensor([3.5, 3.5]),
                  "img_ids": FluxPipeline._prepare_latent_image_ids(2, rows, cols, "cpu", torch.float32),
                  "txt_ids": torch.zeros(text, 3), "return_dict": False}
    elif family == "flux2":
        from vlmtools.adapters.flux2 import latent_ids, text_ids

        model = Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=1, num_attention_heads=24,
                                        joint_attention_dim=7680, guidance_embeds=False).eval()
        inputs = {"hidden_states": torch.randn(2, rows * cols, 128), "encoder_hidden_states": torch.randn(2, text, 7680),
                  "timestep": torch.tensor([0.5, 0.7]), "img_ids": latent_ids(2, grid), "txt_ids": text_ids(2, text),
                  "return_dict": False}
    elif family == "qwen_image":
        model = QwenImageTransformer2DModel(num_layers=1).eval()
        mask = torch.ones(2, text, dtype=torch.long)
        mask[1, -2:] = 0
        inputs = {"hidden_states": torch.randn(2, rows * cols, 64), "encoder_hidden_states": torch.randn(2, text, 3584),
                  "encoder_hidden_states_mask": mask, "timestep": torch.tensor([0.5, 0.7]),
                  "img_shapes": [[(1, rows, cols)]] * 2, "return_dict": False}
    elif family == "sd3":
        model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=1,
                                      attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                      caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                      pos_embed_max_size=192, qk_norm="rms_norm").eval()
        inputs = {"hidden_states": torch.randn(2, 16, 2 * rows, 2 * cols), "encoder_hidden_states": torch.randn(2, text, 4096),
                  "pooled_projections": torch.randn(2, 2048), "timestep": torch.tensor([500.0, 700.0]),
                  "return_dict": False}
    elif family == "mochi":
        model = MochiTransformer3DModel(num_layers=2, max_sequence_length=text).eval()
        with torch.no_grad():
            model.pos_frequencies.normal_(0, 0.05)
        mask = torch.ones(2, text, dtype=torch.bool)
        mask[1, -2:] = False
        inputs = {"hidden_states": torch.randn(2, 12, frames, 2 * rows, 2 * cols),
                  "encoder_hidden_states": torch.randn(2, text, 4096), "encoder_attention_mask": mask,
                  "timestep": torch.tensor([500.0, 700.0]), "return_dict": False}
    elif family == "wan":
        model = WanTransformer3DModel(num_layers=1, num_attention_heads=40, ffn_dim=13824).eval()
        inputs = {"hidden_states": torch.randn(2, 16, frames, 2 * rows, 2 * cols),
                  "encoder_hidden_states": torch.randn(2, text, 4096), "timestep": torch.tensor([500.0, 700.0]),
                  "return_dict": False}
    else:
        raise ValueError(f"no published width for {family!r}; known: {', '.join(PUBLISHED)}")
    return model, inputs
