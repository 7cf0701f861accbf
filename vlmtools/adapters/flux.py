"""FLUX (``FluxTransformer2DModel``): double-stream then single-stream blocks, text first.

Double-stream blocks project text and image separately and attend jointly over
``[text, image]``; single-stream blocks receive that concatenation as one sequence.
Rotary embeddings come from ``txt_ids`` and ``img_ids``; the pipeline's ``img_ids``
hold each latent token's (row, col) in raster order, which gives the image grid.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from .dit import DiTAdapter, Probe


class FluxProbe(Probe):
    """Probe that reproduces diffusers' ``FluxAttnProcessor`` (same projections, norms, rotary, kernel)."""

    replaces = (FluxAttnProcessor,)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        hooks = self.hooks()
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        def fused():
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                         backend=self.original._attention_backend,
                                         parallel_config=self.original._parallel_config).transpose(1, 2)

        out = self.attend(hooks, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                          fused)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        text_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [text_len, hidden_states.shape[1] - text_len], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def flux_sizes(model, inputs) -> tuple[int, tuple[int, int]]:
    """Text length and latent grid of one transformer call, the grid read from ``img_ids``."""
    ids = inputs["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    rows = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    cols = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    tokens = inputs["hidden_states"].shape[1]
    if rows * cols != tokens:
        raise ValueError(f"vlmtools: img_ids span a {rows}x{cols} grid but there are {tokens} image tokens; "
                         "several images in one sequence (e.g. FLUX Kontext references) are not supported")
    return inputs["encoder_hidden_states"].shape[1], (rows, cols)


ADAPTER = DiTAdapter(
    family="flux",
    classes=("FluxTransformer2DModel",),
    streams=(("double", "transformer_blocks"), ("single", "single_transformer_blocks")),
    probe=FluxProbe,
    sizes=flux_sizes,
)
