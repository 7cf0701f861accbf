"""Tiny random FluxPipeline, StableDiffusion3Pipeline, WanPipeline and MochiPipeline, built offline in seconds.

Real diffusers pipeline classes with real (tiny) components: a word-level fast
tokenizer standing in for CLIP's and T5's (only its offsets and ids matter to
RefAM), random CLIP / T5 text encoders, a 2-block AutoencoderKL (scale factor 2),
and the transformers of ``vlmtools.testing.dit``. Images are 16 x 16 RGB: a 4 x 4 grid.
The video pipelines have their own tiny causal VAEs at the real compression (Wan: 4
frames and 8 x 8 pixels per latent, Mochi: 6 frames and 8 x 8), and patches of 2 x 2:
``VIDEO_SIZE`` frames (W, H) of 48 x 32 give a 2 x 3 grid per latent frame.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLMochi,
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    MochiPipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from .dit import tiny_flux, tiny_mochi, tiny_sd3, tiny_wan

WORDS = [
    "the",
    "a",
    "an",
    "large",
    "small",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "cross",
    "on",
    "of",
    "with",
    "left",
    "right",
    "top",
    ".",
    ",",
]
SIZE = 16


def tiny_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer that appends ``</s>`` (id 1), pads with ``<pad>`` (id 0)."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _clip(cls, hidden: int, projection: int = 8):
    config = CLIPTextConfig(
        vocab_size=len(WORDS) + 3,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection,
        eos_token_id=1,
        pad_token_id=0,
    )
    return cls(config).eval()


def _t5(d_model: int = 32):
    return T5EncoderModel(
        T5Config(vocab_size=len(WORDS) + 3, d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    ).eval()


def _vae(latent_channels: int):
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def tiny_flux_pipeline(max_sequence_length: int = 12) -> FluxPipeline:
    """CLIP (pooled, 16 dims) and T5 (sequence, 32 dims) as FLUX uses them; T5 pads to ``max_sequence_length``."""
    torch.manual_seed(0)
    transformer, _ = tiny_flux()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(2),
        text_encoder=_clip(CLIPTextModel, 16),
        tokenizer=tiny_tokenizer(16),
        text_encoder_2=_t5(),
        tokenizer_2=tiny_tokenizer(max_sequence_length),
        transformer=transformer,
    )


def tiny_sd3_pipeline() -> StableDiffusion3Pipeline:
    """Two CLIPs (hidden 8 + 8, projections 8 + 8 = pooled 16) and T5 (32 = joint_attention_dim)."""
    torch.manual_seed(0)
    transformer, _ = tiny_sd3()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(4),
        text_encoder=_clip(CLIPTextModelWithProjection, 8),
        tokenizer=tiny_tokenizer(16),
        text_encoder_2=_clip(CLIPTextModelWithProjection, 8),
        tokenizer_2=tiny_tokenizer(16),
        text_encoder_3=_t5(),
        tokenizer_3=tiny_tokenizer(16),
    )


VIDEO_SIZE = (48, 32)


def tiny_wan_pipeline(max_sequence_length: int = 12) -> WanPipeline:
    """T5 (32 dims = the transformer's text_dim) padded with zeros to ``max_sequence_length``, a Wan VAE of 4 latent
    channels (latents_mean 0, latents_std 1) compressing 4 frames and 8 x 8 pixels."""
    torch.manual_seed(0)
    transformer, _ = tiny_wan(text=max_sequence_length)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    return WanPipeline(tokenizer=tiny_tokenizer(max_sequence_length), text_encoder=_t5(), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer)


def tiny_mochi_pipeline(max_sequence_length: int = 12) -> MochiPipeline:
    """T5 (32 dims) with its mask, a Mochi VAE of 4 latent channels compressing 6 frames and 8 x 8 pixels."""
    torch.manual_seed(0)
    transformer, _ = tiny_mochi(text=max_sequence_length)
    vae = AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             latent_channels=4, layers_per_block=(1,) * 5, add_attention_block=(False,) * 5,
                             latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4).eval()
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5(),
                         tokenizer=tiny_tokenizer(max_sequence_length), transformer=transformer)
