"""Qwen-Image (``QwenImageTransformer2DModel``): dual-stream blocks, text first.

Every block projects text and image apart (qk RMS-norm, complex rotary from the
image's ``(frame, row, col)`` frequencies and the text's after them) and attends jointly
over ``[text, image]``; ``encoder_hidden_states_mask`` (the prompt's padding) becomes a key
mask over the joint sequence. The latent grid is the call's ``img_shapes`` entry
``(1, rows, cols)``; several shapes per sample (Qwen-Image-Edit's reference images) are
refused. ``fuse_qkv_projections()`` leaves this processor as it is (it reads the separate
projections), so a fused model is served as an unfused one. RefAM reads a ``QwenImagePipeline`` or a bare
transformer through :class:`QwenImageSource` / :class:`QwenImageTransformerSource`; with no rule of its own
it reads the middle third of the blocks.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from .dit import DiTAdapter, Probe
from .dit_source import EncodedPrompt, Source, chat_segment, normalised_latents


class QwenImageProbe(Probe):
    """Reproduces ``QwenDoubleStreamAttnProcessor2_0`` (projections, qk-norm, rotary, text mask, kernel)."""

    replaces = (QwenDoubleStreamAttnProcessor2_0,)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        hooks = self.hooks()
        if not hooks or encoder_hidden_states is None or attention_mask is not None:  # the processor raises there
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        img_query, img_key, img_value = (proj(hidden_states).unflatten(-1, (-1, head_dim))
                                         for proj in (attn.to_q, attn.to_k, attn.to_v))
        txt_query, txt_key, txt_value = (proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                                         for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        query = torch.cat([txt_query, img_query], dim=1)
        key = torch.cat([txt_key, img_key], dim=1)
        value = torch.cat([txt_value, img_value], dim=1)

        def fused():
            return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                         backend=self.original._attention_backend,
                                         parallel_config=self.original._parallel_config).transpose(1, 2)

        out = self.attend(hooks, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                          fused)
        joint = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        img_out = attn.to_out[0](joint[:, seq_txt:, :].contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(joint[:, :seq_txt, :].contiguous())


def qwen_image_sizes(model, inputs) -> tuple[int, tuple[int, int]]:
    """Text length and latent grid of one call, the grid from ``img_shapes`` (one ``(1, rows, cols)`` per sample)."""
    shapes = inputs.get("img_shapes")
    if not shapes:
        raise ValueError("vlmtools: a Qwen-Image call needs img_shapes=[[(1, rows, cols)]] * batch, as its pipeline "
                         "passes; it gives the latent grid")
    shapes = shapes[0] if isinstance(shapes[0], list) else shapes
    frames, rows, cols = shapes[0]
    tokens = inputs["hidden_states"].shape[1]
    if len(shapes) != 1 or frames != 1 or rows * cols != tokens:
        raise ValueError(f"vlmtools: img_shapes {shapes} do not describe the call's {tokens} image tokens as one "
                         "image; several images in one sequence (Qwen-Image-Edit references) are not supported")
    return inputs["encoder_hidden_states"].shape[1], (rows, cols)


class QwenImageTransformerSource(Source):
    """Qwen-Image calls: packed latents ``(B, N, 4C)``, the prompt's mask (its segments' real tokens),
    ``img_shapes``, timestep = t (the pipeline passes sigma)."""

    family = "qwen_image"

    def __init__(self, transformer, guidance: float = 1.0):
        super().__init__(transformer)
        self.guidance = guidance

    def call(self, x_t, t, prompt, grid):
        x_t, batch = self._tensor(x_t), x_t.shape[0]
        mask = torch.tensor([r for segment in prompt.segments for r in segment.real], device=x_t.device)
        kwargs = {
            "hidden_states": x_t,
            "encoder_hidden_states": self._tensor(prompt.embeds).expand(batch, -1, -1),
            "encoder_hidden_states_mask": mask[None].expand(batch, -1),
            "timestep": x_t.new_full((batch,), t),
            "img_shapes": [[(1, *grid)]] * batch,
            "return_dict": False,
        }
        if self.transformer.config.guidance_embeds:
            kwargs["guidance"] = x_t.new_full((batch,), self.guidance)
        return kwargs


class QwenImageSource(QwenImageTransformerSource):
    """A diffusers ``QwenImagePipeline``: its VAE (one frame; latents normalised by ``latents_mean`` /
    ``latents_std``, packed in 2 x 2 patches) and Qwen2.5-VL encoder, which reads the prompt inside the
    pipeline's chat template; the pipeline drops the template's first ``prompt_template_encode_start_idx``
    tokens (its system turn) from the features, and so does the source. The rest of the template (the end of
    the user turn, the assistant's header) stays: RefAM gives it the role special."""

    def __init__(self, pipe, guidance: float = 1.0, max_sequence_length: int = 1024):
        super().__init__(pipe.transformer, guidance)
        self.pipe, self.max_length = pipe, max_sequence_length
        self.multiple = pipe.vae_scale_factor * 2

    def latents(self, image):
        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(image)[:, :, None]  # one frame: (1, 3, 1, H, W)
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        latents = normalised_latents(vae, latents)[:, :, 0]
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width), (height // 2, width // 2)

    def prompt(self, text):
        pipe, drop = self.pipe, self.pipe.prompt_template_encode_start_idx
        templated = pipe.prompt_template_encode.format(text)
        enc = pipe.tokenizer(templated, return_offsets_mapping=True)
        length = min(self.max_length, pipe.tokenizer_max_length)
        if len(enc["input_ids"]) - drop > length:
            raise ValueError(f"RefAM: the prompt {text!r} in Qwen-Image's chat template takes "
                             f"{len(enc['input_ids']) - drop} tokens, more than the {length} the pipeline keeps")
        dropped = chat_segment(enc["offset_mapping"][:drop], enc["attention_mask"][:drop], templated, text)
        if any(end > start for start, end in dropped.offsets):
            raise ValueError(f"RefAM: the pipeline drops the first {drop} tokens of its chat template, and with this "
                             "tokenizer they reach into the prompt; use Qwen-Image's own tokenizer")
        segment = chat_segment(enc["offset_mapping"][drop:], enc["attention_mask"][drop:], templated, text)
        embeds, _ = pipe.encode_prompt(text, max_sequence_length=self.max_length)
        return EncodedPrompt(embeds, None, [segment])


ADAPTER = DiTAdapter(
    family="qwen_image",
    classes=("QwenImageTransformer2DModel",),
    streams=(("joint", "transformer_blocks"),),
    probe=QwenImageProbe,
    sizes=qwen_image_sizes,
    sources=(("QwenImagePipeline", QwenImageSource), ("QwenImageTransformer2DModel", QwenImageTransformerSource)),
)
