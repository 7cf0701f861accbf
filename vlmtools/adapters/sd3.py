"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): joint blocks, image first.

Every block's ``attn`` attends jointly over ``[image, text]``; the last block is
``context_pre_only`` (no text output projection). SD3.5's dual-attention blocks add
an image-only ``attn2``, which is not a site. The image grid is the latent's
height and width divided by the patch size. ``fuse_qkv_projections()`` sets
``FusedJointAttnProcessor2_0``, which reads ``to_qkv`` / ``to_added_qkv`` and applies no
qk-norm (SD3.5's norms are skipped by diffusers' fused path): the probe reproduces that too. RefAM reads a ``StableDiffusion3Pipeline`` or a bare
transformer through :class:`SD3Source` / :class:`SD3TransformerSource`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import FusedJointAttnProcessor2_0, JointAttnProcessor2_0

from .dit import DiTAdapter, Probe
from .dit_source import EncodedPrompt, Segment, Source, token_segment, vae_latents


class JointProbe(Probe):
    """Probe that reproduces diffusers' ``JointAttnProcessor2_0`` (which ignores ``attention_mask``) and
    ``FusedJointAttnProcessor2_0`` (fused projections, no qk-norm)."""

    replaces = (JointAttnProcessor2_0, FusedJointAttnProcessor2_0)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        hooks = self.hooks()
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if isinstance(self.original, FusedJointAttnProcessor2_0):
            return self.fused_projections(hooks, attn, hidden_states, encoder_hidden_states)
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


    def fused_projections(self, hooks, attn, hidden_states, encoder_hidden_states):
        """``FusedJointAttnProcessor2_0``: one q/k/v projection per stream, no qk-norm, SDPA over ``[image, text]``."""
        batch, image_len = hidden_states.shape[0], hidden_states.shape[1]
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        text_query, text_key, text_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        query, key, value = (_heads(attn, torch.cat(pair, dim=1)) for pair in
                             ((query, text_query), (key, text_key), (value, text_value)))
        out = self.attend(hooks, query, key, value, None,
                          lambda: F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False))
        hidden_states = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    """``(B, L, H * D) -> (B, H, L, D)`` as the processor reshapes its projections."""
    return x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def sd3_sizes(model, inputs) -> tuple[int, tuple[int, int]]:
    """Text length and patch grid of one transformer call, from the latent's height and width."""
    height, width = inputs["hidden_states"].shape[-2:]
    patch = model.config.patch_size
    return inputs["encoder_hidden_states"].shape[1], (height // patch, width // patch)


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


class SD3Source(SD3TransformerSource):
    """A diffusers ``StableDiffusion3Pipeline``: CLIP-L/G tokens (77) then T5 tokens (zeros without T5)."""

    def __init__(self, pipe, max_sequence_length: int = 256):
        super().__init__(pipe.transformer)
        self.pipe, self.max_length = pipe, max_sequence_length
        self.multiple = pipe.vae_scale_factor * pipe.patch_size

    def latents(self, image):
        latents = vae_latents(self.pipe.vae, self.pipe.image_processor.preprocess(image))
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


ADAPTER = DiTAdapter(
    family="sd3",
    classes=("SD3Transformer2DModel",),
    streams=(("joint", "transformer_blocks"),),
    probe=JointProbe,
    sizes=sd3_sizes,
    image_first=True,
    sources=(("StableDiffusion3Pipeline", SD3Source), ("SD3Transformer2DModel", SD3TransformerSource)),
)
