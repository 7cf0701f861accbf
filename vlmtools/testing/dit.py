"""Tiny random-weight diffusion transformers of the real diffusers classes, with inputs.

Each builder returns ``(model, inputs)``: an fp32 model in eval mode and keyword
inputs for a batch of two on a 3 x 4 latent grid (non-square, so that a swapped
rows/cols shows), with ``TEXT`` text tokens. Builders seed torch.
"""
from __future__ import annotations

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

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
