"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): video self-attention, then cross-attention to the text.

Text enters by cross-attention, not joint attention: each block's ``attn1`` attends over
the video tokens only (3-axis rotary), and its ``attn2`` has the video tokens as queries and
the text (T5, padded to 512 with zeros and no mask) as keys; the image-to-video variant adds
a second, separately normalised attention over CLIP image features in ``attn2``, which the
probe computes as the processor does but which is no site. Sites: ``dit.self.{i}`` (keys:
the video) and ``dit.cross.{i}`` (keys: the text). The layout is the virtual joint
sequence ``[video, text]``: video positions ``0 .. N-1`` (latent frames stacked, grid
``(frames * rows, cols)``), text positions ``N .. N+T-1``; a cross site's key ``k`` is text
position ``N + k``.

What RefAM reads here. A cross site's attention already is each video token's distribution
over the text keys, so a word's map is its share there, as on a joint DiT after restricting
the softmax to the text keys (with no mask, pads keep their share: ``padding="budget"``).
Global sinks: at a cross site a text key is a sink when the attention it receives, averaged
over all (video) queries, is over ``ratio`` times the median over the text keys and its map
over the video queries is flat; at a self site the same over the video keys, which names the
frame and grid cell of a video sink. RefAM reads the text sinks of its cross sites and
reports the video sinks of the same blocks' self-attention. Fused q/k/v
(``fuse_qkv_projections()``: ``to_qkv`` in ``attn1``, ``to_kv`` and ``to_added_kv`` in ``attn2``)
run the same processor and are served alike.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    _get_added_kv_projections,
    _get_qkv_projections,
)

from .dit import DiTAdapter, Probe, Stream
from .dit_source import EncodedPrompt, Source, normalised_latents, token_segment


def _rotary(hidden_states, freqs_cos, freqs_sin):
    """The processor's rotary on (even, odd) channel pairs."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanProbe(Probe):
    """Reproduces ``WanAttnProcessor`` (self- and cross-attention, fused projections, the image-to-video branch)."""

    replaces = (WanAttnProcessor,)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        hooks = self.hooks()
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:  # the processor's rule: the last 512 context tokens are the text
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotary(query, *rotary_emb), _rotary(key, *rotary_emb)
        backend = self.original._attention_backend
        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(query, key_img, value_img, attn_mask=None, dropout_p=0.0,
                                                      is_causal=False, backend=backend, parallel_config=None)
            hidden_states_img = hidden_states_img.flatten(2, 3).type_as(query)
        parallel = self.original._parallel_config if encoder_hidden_states is None else None

        def fused():
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                         backend=backend, parallel_config=parallel).transpose(1, 2)

        out = self.attend(hooks, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                          fused)
        hidden_states = out.transpose(1, 2).flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        return attn.to_out[1](attn.to_out[0](hidden_states))


def wan_sizes(model, inputs) -> tuple[int, tuple[int, int]]:
    """Text length and the grid of the latent frames stacked, ``(frames * rows, cols)`` after patches."""
    _, _, frames, height, width = inputs["hidden_states"].shape
    p_t, p_h, p_w = model.config.patch_size
    return inputs["encoder_hidden_states"].shape[1], ((frames // p_t) * (height // p_h), width // p_w)


def wan_frames(model, inputs) -> int:
    return inputs["hidden_states"].shape[2] // model.config.patch_size[0]


class WanTransformerSource(Source):
    """Wan calls: latents ``(B, C, F, h, w)``, timestep = 1000 t (its flow scheduler's sigmas x 1000), the text
    features as the pipeline pads them. Four video frames per latent frame after the first (its VAE).

    Default blocks: the cross-attention of the middle third of the blocks (the image rule of
    :func:`grounding.refam.default_blocks` applied to Wan's blocks; nothing was measured on Wan here).
    """

    family = "wan"
    temporal = 4

    def __init__(self, transformer):
        super().__init__(transformer)
        layers = transformer.config.num_layers
        self.blocks = tuple(f"dit.cross.{i}" for i in range(layers // 3, max(layers // 3 + 1, 2 * layers // 3)))

    def call(self, x_t, t, prompt, grid):
        x_t, batch = self._tensor(x_t), x_t.shape[0]
        return {
            "hidden_states": x_t,
            "encoder_hidden_states": self._tensor(prompt.embeds).expand(batch, -1, -1),
            "timestep": x_t.new_full((batch,), 1000.0 * t),
            "return_dict": False,
        }


class WanSource(WanTransformerSource):
    """A diffusers ``WanPipeline`` (text to video; also its video-to-video pipeline): its Wan VAE (latents
    normalised by the VAE's ``latents_mean`` / ``latents_std``) and T5 (padded to 512 with zeros, no mask).
    An image is a clip of one frame. Wan 2.2's two experts (``transformer_2`` and ``boundary_ratio``): the
    pipeline denoises with ``transformer`` (high noise) at timesteps ``>= boundary_ratio * num_train_timesteps``
    and with ``transformer_2`` (low noise) below; its timesteps are ``t * num_train_timesteps``, so RefAM reads
    ``transformer`` at flow times ``t >= boundary_ratio``, else ``transformer_2`` (:meth:`transformer_at`)."""

    def __init__(self, pipe, max_sequence_length: int = 512):
        super().__init__(pipe.transformer)
        self.pipe, self.max_length = pipe, max_sequence_length
        self.temporal = pipe.vae_scale_factor_temporal
        self.multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]

    def transformer_at(self, t):
        boundary = self.pipe.config.boundary_ratio
        if boundary is None or self.pipe.transformer_2 is None or t >= boundary:
            return self.transformer
        return self.pipe.transformer_2

    def clip_latents(self, frames):
        vae = self.pipe.vae
        video = self.pipe.video_processor.preprocess_video(list(frames)).to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(video).latent_dist.mode()
        latents = normalised_latents(vae, latents)
        p_t, p_h, p_w = self.transformer.config.patch_size
        return latents, (latents.shape[2] // p_t, latents.shape[3] // p_h, latents.shape[4] // p_w)

    def latents(self, image):
        latents, grid = self.clip_latents([image])
        return latents, grid[1:]

    def prompt(self, text):
        embeds, _ = self.pipe.encode_prompt(text, do_classifier_free_guidance=False,
                                            max_sequence_length=self.max_length)
        return EncodedPrompt(embeds, None, [token_segment(self.pipe.tokenizer, text, self.max_length)])


ADAPTER = DiTAdapter(
    family="wan",
    classes=("WanTransformer3DModel",),
    streams=(Stream("self", "blocks", "attn1", keys="image"), Stream("cross", "blocks", "attn2", keys="text")),
    probe=WanProbe,
    sizes=wan_sizes,
    frames=wan_frames,
    image_first=True,
    sources=(("WanPipeline", WanSource), ("WanVideoToVideoPipeline", WanSource),
             ("WanTransformer3DModel", WanTransformerSource)),
)
