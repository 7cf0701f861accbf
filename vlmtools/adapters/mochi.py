"""Mochi (``MochiTransformer3DModel``): joint attention over video and text tokens, video first.

Every block's ``attn1`` projects the video tokens (patches of each latent frame, frames in
order, each in raster order) and the text apart, with qk RMS-norm and a 3-axis rotary on
the video, and attends jointly over ``[video, text]``. The prompt's padding never takes
part: the processor drops padded text tokens sample by sample (their outputs are zeros),
which the probe gives the seam as a key mask. The last block is ``context_pre_only``. The
layout stacks the latent frames: grid ``(frames * rows, cols)``, ``frames`` from the
latents; the frame of a video token is its grid row // rows. diffusers has no fused-q/k/v
path for Mochi (no ``fuse_qkv_projections``). RefAM reads a ``MochiPipeline`` or a bare transformer
through :class:`MochiSource` / :class:`MochiTransformerSource`; with no rule of its own it reads the
middle third of the blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttnProcessor2_0

from .dit import DiTAdapter, Probe, Stream
from .dit_source import EncodedPrompt, Source, token_segment


def _rotary(x, freqs_cos, freqs_sin):
    """The processor's rotary on (even, odd) channel pairs."""
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiProbe(Probe):
    """Reproduces ``MochiAttnProcessor2_0``: its per-sample attention over the video and the real text tokens."""

    replaces = (MochiAttnProcessor2_0,)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        hooks = self.hooks()
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1))
                             for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        encoder_query, encoder_key, encoder_value = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                                                     for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            encoder_query = attn.norm_added_q(encoder_query)
        if attn.norm_added_k is not None:
            encoder_key = attn.norm_added_k(encoder_key)
        if image_rotary_emb is not None:
            query, key = _rotary(query, *image_rotary_emb), _rotary(key, *image_rotary_emb)
        video = query.shape[1]
        query, key, value = (torch.cat([x, e], dim=1).transpose(1, 2) for x, e in
                             ((query, encoder_query), (key, encoder_key), (value, encoder_value)))
        real = [mask.flatten().nonzero().flatten() for mask in attention_mask]  # real text tokens per sample
        seen = torch.cat([attention_mask.new_ones(attention_mask.shape[0], video), attention_mask], 1).bool()

        def fused():  # the processor's loop, each output row at its own position (padded text rows zero)
            out = query.new_zeros(query.shape[:3] + value.shape[-1:])
            for b, text in enumerate(real):
                keep = torch.cat([torch.arange(video, device=text.device), video + text])
                out[b, :, keep] = F.scaled_dot_product_attention(
                    query[b:b + 1, :, keep], key[b:b + 1, :, keep], value[b:b + 1, :, keep], dropout_p=0.0,
                    is_causal=False)[0]
            return out

        out = self.attend(hooks, query, key, value, seen[:, None, None, :], fused)
        # the processor's order: the real text tokens' rows follow the video's, then zeros
        arranged = out.new_zeros(out.shape)
        for b, text in enumerate(real):
            arranged[b, :, :video] = out[b, :, :video]
            arranged[b, :, video:video + len(text)] = out[b, :, video + text]
        hidden_states, encoder_hidden_states = arranged.transpose(1, 2).flatten(2, 3).split_with_sizes(
            (video, encoder_hidden_states.shape[1]), dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def mochi_sizes(model, inputs) -> tuple[int, tuple[int, int]]:
    """Text length and the grid of the latent frames stacked, ``(frames * rows, cols)`` after patches."""
    _, _, frames, height, width = inputs["hidden_states"].shape
    patch = model.config.patch_size
    return inputs["encoder_hidden_states"].shape[1], (frames * (height // patch), width // patch)


def mochi_frames(model, inputs) -> int:
    return inputs["hidden_states"].shape[2]


class MochiTransformerSource(Source):
    """Mochi calls: latents ``(B, C, F, h, w)``, the prompt's mask (its segments' real tokens) as
    ``encoder_attention_mask``, timestep = 1000 (1 - t): Mochi's scheduler runs inverted sigmas, so
    the pipeline's timestep at noise level t is 1000 (1 - t). Six video frames per latent frame
    after the first (its VAE)."""

    family = "mochi"
    temporal = 6

    def call(self, x_t, t, prompt, grid):
        x_t, batch = self._tensor(x_t), x_t.shape[0]
        mask = torch.tensor([r for segment in prompt.segments for r in segment.real], device=x_t.device).bool()
        return {
            "hidden_states": x_t,
            "encoder_hidden_states": self._tensor(prompt.embeds).expand(batch, -1, -1),
            "encoder_attention_mask": mask[None].expand(batch, -1),
            "timestep": x_t.new_full((batch,), 1000.0 * (1 - t)),
            "return_dict": False,
        }


class MochiSource(MochiTransformerSource):
    """A diffusers ``MochiPipeline``: its VAE (latents normalised as the pipeline un-normalises them before
    decoding: ``(z - latents_mean) * scaling_factor / latents_std``) and T5 (256 tokens, with its mask).
    An image is a clip of one frame."""

    def __init__(self, pipe, max_sequence_length: int = 256):
        super().__init__(pipe.transformer)
        self.pipe, self.max_length = pipe, max_sequence_length
        self.temporal = pipe.vae_temporal_scale_factor
        self.multiple = pipe.vae_spatial_scale_factor * pipe.transformer.config.patch_size

    def clip_latents(self, frames):
        vae = self.pipe.vae
        video = self.pipe.video_processor.preprocess_video(list(frames)).to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(video).latent_dist.mode()
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)
            latents = (latents - mean) * config.scaling_factor / std
        else:
            latents = latents * config.scaling_factor
        patch = self.transformer.config.patch_size
        return latents, (latents.shape[2], latents.shape[3] // patch, latents.shape[4] // patch)

    def latents(self, image):
        latents, grid = self.clip_latents([image])
        return latents, grid[1:]

    def prompt(self, text):
        embeds, _, _, _ = self.pipe.encode_prompt(text, do_classifier_free_guidance=False,
                                                  max_sequence_length=self.max_length)
        return EncodedPrompt(embeds, None, [token_segment(self.pipe.tokenizer, text, self.max_length)])


ADAPTER = DiTAdapter(
    family="mochi",
    classes=("MochiTransformer3DModel",),
    streams=(Stream("joint", "transformer_blocks", "attn1"),),
    probe=MochiProbe,
    sizes=mochi_sizes,
    frames=mochi_frames,
    image_first=True,
    sources=(("MochiPipeline", MochiSource), ("MochiTransformer3DModel", MochiTransformerSource)),
)
