"""FLUX (``FluxTransformer2DModel``): double-stream then single-stream blocks, text first.

Double-stream blocks project text and image separately and attend jointly over
``[text, image]``; single-stream blocks receive that concatenation as one sequence.
Rotary embeddings come from ``txt_ids`` and ``img_ids``; the pipeline's ``img_ids``
hold each latent token's (row, col) in raster order, which gives the image grid.
RefAM reads a ``FluxPipeline`` or a bare transformer through :class:`FluxSource` /
:class:`FluxTransformerSource`, by default on the first half of the single-stream blocks.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from .dit import DiTAdapter, Probe
from .dit_source import EncodedPrompt, Source, token_segment, vae_latents


def joint_qkv(attn, hidden_states, encoder_hidden_states=None):
    """q, k, v ``(B, L, H, D)`` as ``FluxAttnProcessor`` and FLUX.2's ``Flux2AttnProcessor`` compute them (the
    same steps): projections (fused or not), qk-norm, and the text's prepended where the module projects it."""
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
    return query, key, value


class FluxProbe(Probe):
    """Probe that reproduces diffusers' ``FluxAttnProcessor`` (same projections, norms, rotary, kernel)."""

    replaces = (FluxAttnProcessor,)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        hooks = self.hooks()
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states)
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


class FluxTransformerSource(Source):
    """FLUX calls: packed latents, (0, row, col) image ids, timestep = t, guidance when embedded.

    Default blocks: the first half of the single-stream blocks (the paper reads "middle-to-late
    blocks" of real checkpoints; nothing of full size was measured here).
    """

    family = "flux"

    def __init__(self, transformer, guidance: float = 3.5):
        super().__init__(transformer)
        self.guidance = guidance
        single = transformer.config.num_single_layers
        self.blocks = tuple(f"dit.single.{i}" for i in range(max(1, single // 2))) if single else None

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


class FluxSource(FluxTransformerSource):
    """A diffusers ``FluxPipeline``: its VAE, CLIP (pooled) and T5 (sequence, padded to 512, no mask)."""

    def __init__(self, pipe, guidance: float = 3.5, max_sequence_length: int = 512):
        super().__init__(pipe.transformer, guidance)
        self.pipe, self.max_length = pipe, max_sequence_length
        self.multiple = pipe.vae_scale_factor * 2

    def latents(self, image):
        latents = vae_latents(self.pipe.vae, self.pipe.image_processor.preprocess(image))
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width), (height // 2, width // 2)

    def prompt(self, text):
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=text, prompt_2=None, max_sequence_length=self.max_length
        )
        segment = token_segment(self.pipe.tokenizer_2, text, self.max_length)
        return EncodedPrompt(embeds, pooled, [segment], text_ids)


ADAPTER = DiTAdapter(
    family="flux",
    classes=("FluxTransformer2DModel",),
    streams=(("double", "transformer_blocks"), ("single", "single_transformer_blocks")),
    probe=FluxProbe,
    sizes=flux_sizes,
    sources=(("FluxPipeline", FluxSource), ("FluxTransformer2DModel", FluxTransformerSource)),
)
