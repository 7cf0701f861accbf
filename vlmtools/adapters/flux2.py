"""FLUX.2 (``Flux2Transformer2DModel``): double-stream then single-stream blocks, text first.

As FLUX.1, double-stream blocks project text and image apart and attend jointly over
``[text, image]``; the single-stream blocks are "parallel" blocks whose one projection
gives q, k, v and the MLP input together (``Flux2ParallelSelfAttnProcessor``), so their
q/k/v are always fused. Rotary embeddings come from 4-axis ids ``(t, row, col, l)``:
``img_ids`` hold each latent token's row and column in raster order, which gives the grid;
reference images of an edit (tokens with another ``t``) are refused. A fused double-stream
block (``fuse_qkv_projections()``) runs the same processor, which reads ``to_qkv``.
RefAM reads a ``Flux2Pipeline``, a ``Flux2KleinPipeline`` or a bare transformer through
:class:`Flux2Source`, :class:`Flux2KleinSource` or :class:`Flux2TransformerSource`, by default on
the first half of the single-stream blocks (FLUX.1's rule: nothing was measured on FLUX.2).
"""
from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor

from .dit import DiTAdapter, Probe, Stream
from .dit_source import EncodedPrompt, Source, chat_segment
from .flux import joint_qkv


class _Flux2Probe(Probe):
    def kernel(self, query, key, value, attention_mask):
        """The processor's own kernel: diffusers' dispatcher with the original backend, ``(B, L, H, D)``."""
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                     backend=self.original._attention_backend,
                                     parallel_config=self.original._parallel_config)

    def joint(self, hooks, query, key, value, attention_mask, image_rotary_emb) -> torch.Tensor:
        """Rotary, then the planned attention of ``(B, L, H, D)`` q/k/v; ``(B, L, H * D)`` out."""
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self.attend(hooks, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                          lambda: self.kernel(query, key, value, attention_mask).transpose(1, 2))
        return out.transpose(1, 2).flatten(2, 3).to(query.dtype)


class Flux2Probe(_Flux2Probe):
    """Reproduces ``Flux2AttnProcessor`` (double-stream blocks; fused projections too)."""

    replaces = (Flux2AttnProcessor,)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        hooks = self.hooks()
        if not hooks:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states)
        hidden_states = self.joint(hooks, query, key, value, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return attn.to_out[1](attn.to_out[0](hidden_states)), encoder_hidden_states


class Flux2ParallelProbe(_Flux2Probe):
    """Reproduces ``Flux2ParallelSelfAttnProcessor`` (single-stream blocks: q/k/v and the MLP input from one
    projection, attention and MLP outputs through one output projection)."""

    replaces = (Flux2ParallelSelfAttnProcessor,)

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        hooks = self.hooks()
        if not hooks:
            return self.original(attn, hidden_states, attention_mask, image_rotary_emb)
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        hidden_states = self.joint(hooks, query, key, value, attention_mask, image_rotary_emb)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        return attn.to_out(torch.cat([hidden_states, mlp_hidden_states], dim=-1))


def flux2_sizes(model, inputs) -> tuple[int, tuple[int, int]]:
    """Text length and latent grid of one transformer call, the grid read from ``img_ids`` ``(t, row, col, l)``."""
    ids = inputs["img_ids"]
    ids = ids[0] if ids.ndim == 3 else ids
    rows = int(ids[:, 1].max() - ids[:, 1].min()) + 1
    cols = int(ids[:, 2].max() - ids[:, 2].min()) + 1
    tokens = inputs["hidden_states"].shape[1]
    if rows * cols != tokens or int(ids[:, 0].max() - ids[:, 0].min()) != 0:
        raise ValueError(f"vlmtools: img_ids span a {rows}x{cols} grid in {len(ids[:, 0].unique())} time slot(s) but "
                         f"there are {tokens} image tokens; several images in one sequence (FLUX.2 reference images "
                         "of an edit) are not supported")
    return inputs["encoder_hidden_states"].shape[1], (rows, cols)


def latent_ids(batch: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """The pipelines' ``img_ids``: ``(0, row, col, 0)`` per latent token in raster order, ``(B, N, 4)``."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(grid[0]), torch.arange(grid[1]), torch.arange(1))
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


def text_ids(batch: int, length: int, device=None) -> torch.Tensor:
    """The pipelines' ``txt_ids``: ``(0, 0, 0, l)`` for text position ``l``, ``(B, T, 4)``."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(batch, -1, -1).to(device)


class Flux2TransformerSource(Source):
    """FLUX.2 calls: packed latents ``(B, N, C)``, 4-axis ids, timestep = t (the pipelines pass sigma),
    guidance when the transformer embeds it (FLUX.2 [dev]; the distilled Klein models do not).

    Default blocks: the first half of the single-stream blocks, FLUX.1's rule (the paper reads
    "middle-to-late blocks" of FLUX.1; nothing was measured on FLUX.2 here).
    """

    family = "flux2"

    def __init__(self, transformer, guidance: float = 4.0):
        super().__init__(transformer)
        self.guidance = guidance
        single = transformer.config.num_single_layers
        self.blocks = tuple(f"dit.single.{i}" for i in range(max(1, single // 2))) if single else None

    def call(self, x_t, t, prompt, grid):
        x_t, batch = self._tensor(x_t), x_t.shape[0]
        kwargs = {
            "hidden_states": x_t,
            "encoder_hidden_states": self._tensor(prompt.embeds).expand(batch, -1, -1),
            "timestep": x_t.new_full((batch,), t),
            "img_ids": latent_ids(batch, grid, x_t.device),
            "txt_ids": text_ids(batch, prompt.embeds.shape[1], x_t.device),
            "return_dict": False,
        }
        if self.transformer.config.guidance_embeds:
            kwargs["guidance"] = x_t.new_full((batch,), self.guidance)
        return kwargs


class Flux2Source(Flux2TransformerSource):
    """A diffusers ``Flux2Pipeline``: its VAE (latents in 2 x 2 patches, normalised by the VAE's batch-norm
    statistics: the pipeline's ``_encode_vae_image``) and Mistral 3 encoder, which reads the prompt as the user
    turn after the pipeline's system message, padded to ``max_sequence_length``, no mask (pads, system message
    and template tokens all take part in attention: RefAM gives them the roles padding and special).
    ``text_encoder_out_layers``: the hidden states stacked into the features, as the pipeline's call."""

    def __init__(self, pipe, guidance: float = 4.0, max_sequence_length: int = 512,
                 text_encoder_out_layers: tuple[int, ...] = (10, 20, 30)):
        super().__init__(pipe.transformer, guidance)
        self.pipe, self.max_length, self.layers = pipe, max_sequence_length, tuple(text_encoder_out_layers)
        self.multiple = pipe.vae_scale_factor * 2

    def latents(self, image):
        vae = self.pipe.vae
        pixels = self.pipe.image_processor.preprocess(image).to(device=vae.device, dtype=vae.dtype)
        latents = self.pipe._encode_vae_image(pixels, generator=None)
        return self.pipe._pack_latents(latents), tuple(latents.shape[2:])

    def prompt(self, text):
        templated, length, offsets, mask = self.tokenized(text)
        if length > self.max_length:
            raise ValueError(f"RefAM: the prompt {text!r} in the text encoder's chat template takes {length} tokens, "
                             f"more than the {self.max_length} it sees; raise max_sequence_length")
        embeds, _ = self.pipe.encode_prompt(text, max_sequence_length=self.max_length,
                                            text_encoder_out_layers=self.layers)
        return EncodedPrompt(embeds, None, [chat_segment(offsets, mask, templated, text)])

    def tokenized(self, text: str):
        """The templated prompt as the pipeline's text encoder reads it: the text, its untruncated token count,
        and the character offsets and attention mask of its padded tokens."""
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        messages = format_input([text], system_message=self.pipe.system_message)
        template = self.pipe.tokenizer.apply_chat_template
        length = len(template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)["input_ids"][0])
        enc = template(messages, add_generation_prompt=False, tokenize=True, return_dict=True, padding="max_length",
                       truncation=True, max_length=self.max_length, return_offsets_mapping=True)
        templated = template(messages, add_generation_prompt=False, tokenize=False)
        templated = templated[0] if isinstance(templated, list) else templated
        return templated, length, enc["offset_mapping"][0], enc["attention_mask"][0]


class Flux2KleinSource(Flux2Source):
    """A diffusers ``Flux2KleinPipeline`` (FLUX.2 [klein]): FLUX.2's VAE and a Qwen3 encoder, which reads the
    prompt as the user turn of its chat template (no system turn; the assistant's header, thinking off, after
    it), padded to ``max_sequence_length``, no mask; no guidance embedding."""

    def __init__(self, pipe, max_sequence_length: int = 512, text_encoder_out_layers: tuple[int, ...] = (9, 18, 27)):
        super().__init__(pipe, max_sequence_length=max_sequence_length,
                         text_encoder_out_layers=text_encoder_out_layers)

    def tokenized(self, text):
        tokenizer = self.pipe.tokenizer
        templated = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        enc = tokenizer(templated, padding="max_length", truncation=True, max_length=self.max_length,
                        return_offsets_mapping=True)
        return templated, len(tokenizer(templated)["input_ids"]), enc["offset_mapping"], enc["attention_mask"]


ADAPTER = DiTAdapter(
    family="flux2",
    classes=("Flux2Transformer2DModel",),
    streams=(Stream("double", "transformer_blocks", probe=Flux2Probe),
             Stream("single", "single_transformer_blocks", probe=Flux2ParallelProbe)),
    probe=Flux2Probe,
    sizes=flux2_sizes,
    sources=(("Flux2Pipeline", Flux2Source), ("Flux2KleinPipeline", Flux2KleinSource),
             ("Flux2Transformer2DModel", Flux2TransformerSource)),
)
