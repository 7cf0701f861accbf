"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): joint blocks, image first.

Every block's ``attn`` attends jointly over ``[image, text]``; the last block is
``context_pre_only`` (no text output projection). SD3.5's dual-attention blocks add
an image-only ``attn2``, which is not a site. The image grid is the latent's
height and width divided by the patch size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0

from .dit import DiTAdapter, Probe


class JointProbe(Probe):
    """Probe that reproduces diffusers' ``JointAttnProcessor2_0`` (which ignores ``attention_mask``)."""

    replaces = (JointAttnProcessor2_0,)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        hooks = self.hooks()
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch, image_len = hidden_states.shape[:2]
        query, key, value = (_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_query, text_key, text_value = (_heads(attn, proj(encoder_hidden_states))
                                                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)

        out = self.attend(hooks, query, key, value, None,
                          lambda: F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False))
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states if encoder_hidden_states is None else (hidden_states, encoder_hidden_states)


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    """``(B, L, H * D) -> (B, H, L, D)`` as the processor reshapes its projections."""
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def sd3_sizes(model, inputs) -> tuple[int, tuple[int, int]]:
    """Text length and patch grid of one transformer call, from the latent's height and width."""
    height, width = inputs["hidden_states"].shape[-2:]
    patch = model.config.patch_size
    return inputs["encoder_hidden_states"].shape[1], (height // patch, width // patch)


ADAPTER = DiTAdapter(
    family="sd3",
    classes=("SD3Transformer2DModel",),
    streams=(("joint", "transformer_blocks"),),
    probe=JointProbe,
    sizes=sd3_sizes,
    image_first=True,
)
