"""Tiny random FLUX, FLUX.2 (and [klein]), SD3, Qwen-Image, Wan and Mochi pipelines, built offline in seconds.

Real diffusers pipeline classes with real (tiny) components: a word-level fast
tokenizer standing in for CLIP's and T5's (only its offsets and ids matter to
RefAM), random CLIP / T5 text encoders, a 2-block AutoencoderKL (scale factor 2),
and the transformers of ``vlmtools.testing.dit``. Images are 16 x 16 RGB: a 4 x 4 grid.
FLUX.2, FLUX.2 [klein] and Qwen-Image encode the prompt inside a chat template, with random Mistral 3 /
Qwen3 / Qwen2.5-VL encoders and their own VAEs (FLUX.2's batch-norm statistics planted); their
word-level tokenizers keep newlines as tokens, as the real byte-level ones do, so that
Qwen-Image's pipeline drops exactly its template's 34 leading tokens.
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
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxPipeline,
    MochiPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PixtralImageProcessor,
    PixtralProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
)

from .dit import tiny_flux, tiny_flux2, tiny_mochi, tiny_qwen_image, tiny_sd3, tiny_wan

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


def tiny_wan_pipeline(max_sequence_length: int = 12, boundary_ratio: float | None = None) -> WanPipeline:
    """T5 (32 dims = the transformer's text_dim) padded with zeros to ``max_sequence_length``, a Wan VAE of 4 latent
    channels (latents_mean 0, latents_std 1) compressing 4 frames and 8 x 8 pixels. ``boundary_ratio``: Wan 2.2's
    two experts, ``transformer_2`` (low noise) the same architecture with other weights (noise added)."""
    torch.manual_seed(0)
    transformer, _ = tiny_wan(text=max_sequence_length)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    experts = {}
    if boundary_ratio is not None:
        second, _ = tiny_wan(text=max_sequence_length)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in second.parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        experts = {"transformer_2": second, "boundary_ratio": boundary_ratio}
    return WanPipeline(tokenizer=tiny_tokenizer(max_sequence_length), text_encoder=_t5(), vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(), transformer=transformer, **experts)


def tiny_mochi_pipeline(max_sequence_length: int = 12) -> MochiPipeline:
    """T5 (32 dims) with its mask, a Mochi VAE of 4 latent channels compressing 6 frames and 8 x 8 pixels."""
    torch.manual_seed(0)
    transformer, _ = tiny_mochi(text=max_sequence_length)
    vae = AutoencoderKLMochi(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                             latent_channels=4, layers_per_block=(1,) * 5, add_attention_block=(False,) * 5,
                             latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4).eval()
    return MochiPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5(),
                         tokenizer=tiny_tokenizer(max_sequence_length), transformer=transformer)


def chat_tokenizer(specials: list[str], template: str, bos: str | None = None, padding_side: str = "right"):
    """Word-level tokenizer over ``WORDS`` and a chat template's ``specials``; newlines are tokens, template words
    ``<unk>``; ``bos`` (a special) is the template's to write, not added by the tokenizer."""
    vocab = {"<pad>": 0, "<unk>": 1, "\n": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    vocab |= {token: len(vocab) + i for i, token in enumerate(specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token=bos,
                                        additional_special_tokens=[t for t in specials if t != bos],
                                        padding_side=padding_side)
    tokenizer.chat_template = template
    return tokenizer


MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else m['content'] | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% endif %}{% endfor %}"
)
"""Mistral Small 3's turns (FLUX.2's text encoder): ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]``."""

FLUX2_LAYERS = (1, 2, 3)
"""The tiny encoders' hidden states FLUX.2 stacks (the pipelines' ``text_encoder_out_layers``; (10, 20, 30) for
FLUX.2's Mistral, (9, 18, 27) for [klein]'s Qwen3 at full size)."""


def tiny_flux2_pipeline() -> Flux2Pipeline:
    """A Pixtral processor (left padding) around a Mistral-style chat tokenizer, a 3-layer Mistral 3 (16 dims:
    FLUX2_LAYERS stacked give the transformer's 48), a 2-block FLUX.2 VAE of 2 channels (8 after its 2 x 2
    patches) with planted batch-norm statistics."""
    torch.manual_seed(0)
    transformer, _ = tiny_flux2(context_dim=48)
    specials = ["<s>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tokenizer = chat_tokenizer(specials, MISTRAL_TEMPLATE, bos="<s>", padding_side="left")
    processor = PixtralProcessor(PixtralImageProcessor(), tokenizer, patch_size=4, chat_template=MISTRAL_TEMPLATE)
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "max_position_embeddings": 256}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "head_dim": 8, "patch_size": 4, "image_size": 32}
    encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))).eval()
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             block_out_channels=(8, 8), latent_channels=2, norm_num_groups=4, layers_per_block=1).eval()
    vae.bn.running_mean.normal_(0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                         tokenizer=processor, transformer=transformer)


QWEN3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
"""Qwen3's turns (FLUX.2 [klein]'s text encoder), thinking switched off as its pipeline asks."""


def tiny_flux2_klein_pipeline() -> Flux2KleinPipeline:
    """A Qwen3-style chat tokenizer (right padding), a 3-layer Qwen3 (16 dims: FLUX2_LAYERS stacked give 48), the
    FLUX.2 VAE of :func:`tiny_flux2_pipeline`, a transformer without guidance embedding (as [klein]'s)."""
    flux2 = tiny_flux2_pipeline()
    torch.manual_seed(0)
    transformer, _ = tiny_flux2(context_dim=48, guidance=False)
    tokenizer = chat_tokenizer(["<|im_start|>", "<|im_end|>", "<think>", "</think>"], QWEN3_TEMPLATE)
    encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=8, max_position_embeddings=256)).eval()
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux2.vae, text_encoder=encoder,
                              tokenizer=tokenizer, transformer=transformer, is_distilled=True)


def tiny_qwen_image_pipeline() -> QwenImagePipeline:
    """A Qwen-style chat tokenizer, a 2-layer Qwen2.5-VL (32 dims), a Qwen-Image VAE of 4 channels (16 after the
    pipeline's 2 x 2 packing) with planted latent statistics."""
    torch.manual_seed(0)
    transformer, _ = tiny_qwen_image()
    tokenizer = chat_tokenizer(["<|im_start|>", "<|im_end|>"], "")
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "bos_token_id": None, "eos_token_id": None,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    vision = {"depth": 1, "hidden_size": 16, "out_hidden_size": 32, "intermediate_size": 32, "num_heads": 2,
              "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 16,
              "fullatt_block_indexes": [0]}
    encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision)).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                             tokenizer=tokenizer, transformer=transformer)
