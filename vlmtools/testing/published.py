"""Every VLM family at the width of its most used published size, random weights.

:func:`full_width` builds a family's model with its published checkpoint's language-model width (hidden size,
attention heads, KV heads, head size, MLP size) and its published vision tower configuration, but three LM
layers (Qwen3.5: four, one period of its Gated DeltaNet / attention pattern) and a cut vision tower (the tower's special block indexes, DeepStack taps and full-attention blocks,
remapped into it; feature layers counted from the end stay as published) and a cut vocabulary (the special
token ids moved into it, read back from the config); ``layers=None`` keeps every layer of both (the
benchmarks' ``--full``, bf16 on a GPU). :func:`published_inputs` is a left-padded batch of two prompts from the
family's image processor, built offline with the published values written in; token ids come from the config.
``reduced=True`` shrinks the tower's input resolution (and the processor's sizes with it) so that a CPU runs
forwards while every piece of the family's token structure stays (tiles, newlines, crops, windows, pooling).

>>> model, inputs = full_width("qwen2_5_vl")              # 3 LM layers at 3584 wide, a 4-block tower, fp32, CPU
>>> config = published_config("llava_next")                # the published resolution, for layouts
>>> inputs = published_inputs("llava_next", config, reduced=False)

No tokenizer is needed: the prompts are text ids 10.., the family's image placeholders as many as the
processor's output gives (the model's own packing where it depends on the image size), and its markers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

VOCAB = 2048
"""The cut vocabulary: special token ids move to its top."""
TEXT = 10
"""The first id of the prompts' text tokens."""

_CLIP_MEAN, _CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_HALF = [0.5, 0.5, 0.5]
_CLIP_L336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
_SIGLIP_SO400M = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                  "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14,
                  "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": False}
_QWEN2_7B = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "hidden_act": "silu"}


@dataclass(frozen=True)
class Family:
    """One family's published size: ``checkpoint`` (what the widths are read from), ``config(layers, vision,
    reduced)`` (``layers`` LM layers, None: all; ``vision`` True: the whole tower, else the cut one), ``processor
    (reduced)``, the ``images`` (height, width) of the batch's two prompts at the published and reduced
    resolutions, and ``prompt(config, pixels, sample)``: the image part of a prompt's ids."""

    checkpoint: str
    config: Callable[[int | None, bool, bool], Any]
    processor: Callable[[bool], Any]
    images: tuple[tuple[int, int], tuple[int, int]]
    reduced_images: tuple[tuple[int, int], tuple[int, int]]
    prompt: Callable[[Any, dict, int], list[int]]
    pixel_keys: tuple[str, ...] = ("pixel_values",)


def _cut(layers: int | None, published: int) -> int:
    return published if layers is None else layers


def _ids(config, names: tuple[str, ...], text_keys: tuple[str, ...] = ("bos_token_id", "eos_token_id", "pad_token_id")):
    """Move the config's special token ids (and the text config's) into the cut vocabulary's top ids."""
    text = config.get_text_config()
    text.vocab_size = VOCAB
    slot = VOCAB - 1
    for owner, keys in ((config, names), (text, text_keys)):
        for key in keys:
            if getattr(owner, key, None) is not None:
                setattr(owner, key, slot)
                slot -= 1
    return config


# -- the families --------------------------------------------------------------------------------------------------


def _llava_config(layers, vision, reduced):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=_cut(layers, 32),
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096)
    tower = _CLIP_L336 | {"num_hidden_layers": 24 if vision else 3, "image_size": 112 if reduced else 336}
    config = LlavaConfig(vision_config=CLIPVisionConfig(**tower), text_config=text, image_token_index=32000,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _ids(config, ("image_token_id",))


def _llava_processor(reduced):
    from transformers import CLIPImageProcessor

    side = 112 if reduced else 336
    return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                              image_mean=_CLIP_MEAN, image_std=_CLIP_STD, resample=3)


_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _scaled(pinpoints, factor):
    return [[int(h * factor), int(w * factor)] for h, w in pinpoints]


def _llava_next_config(layers, vision, reduced):
    from transformers import CLIPVisionConfig, LlavaNextConfig, MistralConfig

    text = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=_cut(layers, 32),
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    tower = _CLIP_L336 | {"num_hidden_layers": 24 if vision else 3, "image_size": 56 if reduced else 336}
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**tower), text_config=text, image_token_index=32000,
                             image_grid_pinpoints=_scaled(_NEXT_PINPOINTS, 1 / 6) if reduced else _NEXT_PINPOINTS,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    return _ids(config, ("image_token_id",))


def _llava_next_processor(reduced):
    from transformers import LlavaNextImageProcessor

    side = 56 if reduced else 336
    return LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                   image_grid_pinpoints=_scaled(_NEXT_PINPOINTS, side / 336), image_mean=_CLIP_MEAN,
                                   image_std=_CLIP_STD, resample=3)


def _qwen_ids(config):
    return _ids(config, ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))


def _qwen2_vl_config(layers, vision, reduced):
    from transformers import Qwen2VLConfig

    text = _QWEN2_7B | {"num_hidden_layers": _cut(layers, 28), "rope_parameters": {
        "rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}}
    tower = {"depth": 32 if vision else 2, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16,
             "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "quick_gelu"}
    config = Qwen2VLConfig(text_config=text, vision_config=tower, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653)
    return _qwen_ids(config)


def _qwen_processor(reduced, patch=14, mean=_CLIP_MEAN, std=_CLIP_STD, least=56 * 56, most=28 * 28 * 16384):
    """Qwen2-VL's published processor (Qwen3-VL: patch 16, at least 65536 and at most 16777216 pixels); reduced:
    at least 64 x 64 pixels."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=64 * 64 if reduced else least, max_pixels=most, patch_size=patch,
                                 merge_size=2, temporal_patch_size=2, image_mean=mean, image_std=std)


def _qwen2_5_vl_config(layers, vision, reduced):
    from transformers import Qwen2_5_VLConfig

    text = _QWEN2_7B | {"num_hidden_layers": _cut(layers, 28), "rope_parameters": {
        "rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}}
    # the full-attention blocks 7, 15, 23, 31 close each quarter of the 32 blocks: 1 and 3 of a 4-block cut
    tower = {"depth": 32 if vision else 4, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
             "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
             "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31] if vision else [1, 3],
             "tokens_per_second": 2, "hidden_act": "silu"}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=tower, image_token_id=151655, video_token_id=151656,
                              vision_start_token_id=151652, vision_end_token_id=151653)
    return _qwen_ids(config)


def _qwen3_vl_config(layers, vision, reduced):
    from transformers import Qwen3VLConfig

    text = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": _cut(layers, 36),
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                                "rope_theta": 5e6}}
    # DeepStack taps 8, 16, 24 of 27 blocks: 1, 2, 3 of a 4-block cut (one per LM layer of the 3)
    tower = {"depth": 27 if vision else 4, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
             "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
             "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24] if vision else [1, 2, 3],
             "hidden_act": "gelu_pytorch_tanh"}
    config = Qwen3VLConfig(text_config=text, vision_config=tower, image_token_id=151655, video_token_id=151656,
                           vision_start_token_id=151652, vision_end_token_id=151653)
    return _qwen_ids(config)


def _qwen3_5_config(layers, vision, reduced):
    from transformers import Qwen3_5Config

    # attention every fourth layer (Gated DeltaNet in the others): the cut keeps one period, four layers
    count = _cut(layers, 32) if layers is None else max(layers, 4)
    text = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": count, "num_attention_heads": 16,
            "num_key_value_heads": 4, "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "mrope_section": [11, 11, 10],
                                                      "mrope_interleaved": True, "rope_theta": 1e7,
                                                      "partial_rotary_factor": 0.25}}
    tower = {"depth": 27 if vision else 2, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
             "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
             "num_position_embeddings": 2304, "hidden_act": "gelu_pytorch_tanh"}
    config = Qwen3_5Config(text_config=text, vision_config=tower, image_token_id=248056, video_token_id=248057,
                           vision_start_token_id=248053, vision_end_token_id=248054)
    return _qwen_ids(config)


def _qwen_prompt(config, pixels, sample):
    merge = config.vision_config.spatial_merge_size
    count = int(pixels["image_grid_thw"][sample].prod()) // merge**2
    return [config.vision_start_token_id] + [config.image_token_id] * count + [config.vision_end_token_id]


def _gemma3_config(layers, vision, reduced):
    from transformers import Gemma3Config

    count = _cut(layers, 34)
    kinds = None if layers is None else (["sliding_attention", "full_attention", "sliding_attention"] * count)[:count]
    text = {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": count, "num_attention_heads": 8,
            "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 1024,
            "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "layer_types": kinds,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    tower = _SIGLIP_SO400M | {"num_hidden_layers": 27 if vision else 2, "image_size": 224 if reduced else 896}
    config = Gemma3Config(text_config=text, vision_config=tower, mm_tokens_per_image=16 if reduced else 256,
                          image_token_index=262144, boi_token_index=255999, eoi_token_index=256000)
    return _ids(config, ("image_token_id", "boi_token_id", "eoi_token_id"))


def _gemma3_processor(reduced):
    from transformers import Gemma3ImageProcessor

    side = 224 if reduced else 896
    return Gemma3ImageProcessor(size={"height": side, "width": side}, image_mean=_HALF, image_std=_HALF, resample=2,
                                do_pan_and_scan=True, pan_and_scan_min_crop_size=side * 256 // 896,
                                pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2)


def _gemma3_prompt(config, pixels, sample):
    views = 1 + int(pixels["num_crops"][sample])
    return ([config.boi_token_id] + [config.image_token_id] * config.mm_tokens_per_image
            + [config.eoi_token_id]) * views


_ONEVISION_PINPOINTS = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]


def _onevision_config(layers, vision, reduced):
    from transformers import LlavaOnevisionConfig

    text = _QWEN2_7B | {"model_type": "qwen2", "num_hidden_layers": _cut(layers, 28),
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    tower = _SIGLIP_SO400M | {"num_hidden_layers": 26 if vision else 2, "image_size": 56 if reduced else 384}
    config = LlavaOnevisionConfig(text_config=text, vision_config=tower, image_token_index=151646,
                                  video_token_index=151647, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                  image_grid_pinpoints=_scaled(_ONEVISION_PINPOINTS, 56 / 384) if reduced
                                  else _ONEVISION_PINPOINTS)
    return _ids(config, ("image_token_id", "video_token_id"))


def _onevision_processor(reduced):
    from transformers import LlavaOnevisionImageProcessor

    side = 56 if reduced else 384
    return LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_mean=_HALF, image_std=_HALF,
                                        image_grid_pinpoints=_scaled(_ONEVISION_PINPOINTS, side / 384), resample=3)


def _packed_prompt(config, pixels, sample, pack):
    """As many placeholders as the model's own ``pack_image_features`` packs for the image's tiles."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    size = pixels["image_sizes"][sample]
    side = config.vision_config.image_size // config.vision_config.patch_size
    tiles = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
    packed, _ = pack([torch.zeros(tiles, side * side, 1)], size[None])
    return [config.image_token_id] * len(packed[0])


def _onevision_prompt(config, pixels, sample):
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    return _packed_prompt(config, pixels, sample, lambda features, sizes: LlavaOnevisionModel.pack_image_features(
        _Shell(config), features, sizes, torch.ones(1), config.vision_aspect_ratio))


def _llava_next_prompt(config, pixels, sample):
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    return _packed_prompt(config, pixels, sample, lambda features, sizes: LlavaNextModel.pack_image_features(
        _Shell(config), features, sizes, "default", torch.ones(1)))


class _Shell:
    """Enough of a model for its ``pack_image_features`` (which reads only the config)."""

    def __init__(self, config):
        self.config = config


def _internvl_config(layers, vision, reduced):
    from transformers import InternVLConfig

    text = _QWEN2_7B | {"model_type": "qwen2", "num_hidden_layers": _cut(layers, 28),
                        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    side = 112 if reduced else 448
    tower = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24 if vision else 2,
             "num_attention_heads": 16, "image_size": [side, side], "patch_size": [14, 14], "norm_type": "layer_norm",
             "layer_scale_init_value": 0.1, "use_qk_norm": False, "use_mean_pooling": True, "hidden_act": "gelu"}
    config = InternVLConfig(text_config=text, vision_config=tower, image_token_id=151667,
                            image_seq_length=(side // 28) ** 2, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config = _ids(config, ("image_token_id",))
    config.image_start_token_id, config.image_end_token_id = VOCAB - 8, VOCAB - 9  # <img>, </img>: the processor's
    return config


def _internvl_processor(reduced):
    from transformers import GotOcr2ImageProcessor

    side = 112 if reduced else 448
    return GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1,
                                 max_patches=12, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                 resample=3)


def _internvl_prompt(config, pixels, sample):
    tiles = int(pixels["num_patches"][sample])
    return [config.image_start_token_id] + [config.image_token_id] * config.image_seq_length * tiles \
        + [config.image_end_token_id]


def _smolvlm_config(layers, vision, reduced):
    from transformers import SmolVLMConfig

    text = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": _cut(layers, 24),
            "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0}}
    tower = {k: v for k, v in _SIGLIP_SO400M.items() if k not in ("model_type", "vision_use_head")}
    tower |= {"num_hidden_layers": 27 if vision else 2, "image_size": 126 if reduced else 384}
    config = SmolVLMConfig(text_config=text, vision_config=tower, image_token_id=49190, scale_factor=3)
    config = _ids(config, ("image_token_id",))
    # the processor's <fake_token_around_image>, <global-img>, newline and <row_i_col_j> tokens
    config.fake_image_token_id, config.global_image_token_id, config.newline_token_id = VOCAB - 8, VOCAB - 9, TEXT + 9
    config.row_col_token_id = VOCAB - 64
    return config


def _smolvlm_processor(reduced):
    from transformers import SmolVLMImageProcessor

    side = 126 if reduced else 384
    return SmolVLMImageProcessor(size={"longest_edge": (2 if reduced else 4) * side}, max_image_size={"longest_edge": side},
                                 do_image_splitting=True, image_mean=_HALF, image_std=_HALF, resample=1)


def _smolvlm_prompt(config, pixels, sample):
    rows, cols = pixels["rows"][sample][0], pixels["cols"][sample][0]
    side = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
    image = [config.image_token_id] * side * side
    fake, marker, newline = config.fake_image_token_id, config.global_image_token_id, config.newline_token_id
    out = []
    for i in range(rows):
        for j in range(cols):
            out += [fake, config.row_col_token_id + i * cols + j] + image
        out += [newline]
    return out + [newline, fake, marker] + image + [fake]


FAMILIES: dict[str, Family] = {
    "llava": Family("llava-hf/llava-1.5-7b-hf", _llava_config, _llava_processor, ((480, 640), (336, 336)),
                    ((160, 200), (112, 112)), lambda c, p, s: [c.image_token_id] * (
                        (c.vision_config.image_size // c.vision_config.patch_size) ** 2)),
    "llava_next": Family("llava-hf/llava-v1.6-mistral-7b-hf", _llava_next_config, _llava_next_processor,
                         ((672, 672), (336, 1008)), ((56, 112), (56, 56)), _llava_next_prompt,
                         ("pixel_values", "image_sizes")),
    "qwen2_vl": Family("Qwen/Qwen2-VL-7B-Instruct", _qwen2_vl_config, lambda r: _qwen_processor(r),
                       ((720, 1280), (448, 448)), ((112, 168), (112, 112)), _qwen_prompt,
                       ("pixel_values", "image_grid_thw")),
    "qwen2_5_vl": Family("Qwen/Qwen2.5-VL-7B-Instruct", _qwen2_5_vl_config, lambda r: _qwen_processor(r),
                         ((720, 1280), (448, 448)), ((112, 224), (112, 112)), _qwen_prompt,
                         ("pixel_values", "image_grid_thw")),
    "qwen3_vl": Family("Qwen/Qwen3-VL-8B-Instruct", _qwen3_vl_config, lambda r: _qwen_processor(r, 16, _HALF, _HALF, 65536, 16777216),
                       ((720, 1280), (448, 448)), ((128, 192), (128, 128)), _qwen_prompt,
                       ("pixel_values", "image_grid_thw")),
    "qwen3_5": Family("Qwen/Qwen3.5-9B", _qwen3_5_config, lambda r: _qwen_processor(r, 16, _HALF, _HALF, 65536, 16777216),
                      ((720, 1280), (448, 448)), ((128, 192), (128, 128)), _qwen_prompt,
                      ("pixel_values", "image_grid_thw")),
    "gemma3": Family("google/gemma-3-4b-it", _gemma3_config, _gemma3_processor, ((896, 896), (600, 1400)),
                     ((224, 224), (150, 350)), _gemma3_prompt),
    "llava_onevision": Family("llava-hf/llava-onevision-qwen2-7b-ov-hf", _onevision_config, _onevision_processor,
                              ((1536, 2304), (720, 1280)), ((56, 112), (56, 56)), _onevision_prompt,
                              ("pixel_values", "image_sizes")),
    "internvl": Family("OpenGVLab/InternVL3-8B-hf", _internvl_config, _internvl_processor, ((896, 1344), (448, 448)),
                       ((112, 336), (112, 112)), _internvl_prompt),
    "smolvlm": Family("HuggingFaceTB/SmolVLM2-2.2B-Instruct", _smolvlm_config, _smolvlm_processor,
                      ((1152, 1536), (384, 384)), ((126, 252), (126, 126)), _smolvlm_prompt,
                      ("pixel_values", "pixel_attention_mask")),
}
"""Family -> its published size (the checkpoint its widths are read from)."""


def published_config(family: str, layers: int | None = 3, vision: bool | None = None, reduced: bool = False):
    """The family's config at its published width: ``layers`` LM layers (None: every published layer, and the
    whole vision tower unless ``vision`` says otherwise), the published resolution unless ``reduced``."""
    spec = _family(family)
    return spec.config(layers, layers is None if vision is None else vision, reduced)


def full_width(family: str, layers: int | None = 3, vision: bool | None = None, reduced: bool = True,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """``(model, inputs)``: the family at its published width (:func:`published_config`), random weights
    (transformers' own initialisation, built in place on ``device`` in ``dtype``), in eval mode, and
    :func:`published_inputs` at the same resolution on that device."""
    config = published_config(family, layers, vision, reduced)
    model = built_in_place(_model_class(config), config, dtype, device, seed)
    if family == "gemma3":  # transformers initialises the projection to zeros: every image would be the same tokens
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    inputs = published_inputs(family, config, reduced)
    return model, {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def built_in_place(model_class, config, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   seed: int = 0):
    """``model_class(config)`` with transformers' own random initialisation (seeded), in eval mode, built in place
    on ``device`` in ``dtype``: no full-precision copy on the CPU first (a whole 7B model in bf16 on a GPU)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model.to(dtype).eval()


def published_inputs(family: str, config, reduced: bool = True, samples: int = 2,
                     text: int | None = None) -> dict[str, torch.Tensor]:
    """A left-padded batch of two prompts, one image each (two sizes), from the family's image processor with its
    published values; ``input_ids``: text ids from :data:`TEXT` around the image's placeholders and markers, token
    ids from ``config``. ``samples=1``: the first prompt alone; ``text``: that many text tokens after each image
    (default 3 and 2)."""
    spec = _family(family)
    processor = spec.processor(reduced)
    rng = np.random.default_rng(0)
    shapes = (spec.reduced_images if reduced else spec.images)[:samples]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    kwargs = {"return_row_col_info": True} if family == "smolvlm" else {}
    batch = [[image] for image in images] if family == "smolvlm" else images
    pixels = dict(processor(images=batch, return_tensors="pt", **kwargs))
    tails = [list(range(TEXT + 2, TEXT + 2 + (n if text is None else text))) for n in (3, 2)]
    prompts = [[TEXT, TEXT + 1] + spec.prompt(config, pixels, 0) + tails[0]]
    if samples == 2:
        prompts.append([TEXT] + spec.prompt(config, pixels, 1) + tails[1])
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    inputs = {"input_ids": ids, "attention_mask": (torch.arange(width) >= width - torch.tensor(
        [[len(p)] for p in prompts])).long()}
    inputs.update({key: pixels[key] for key in spec.pixel_keys})
    if family == "gemma3":
        inputs["token_type_ids"] = (ids == config.image_token_id).long()
    if family.startswith("qwen"):
        inputs["mm_token_type_ids"] = (ids == config.image_token_id).int()
    if family == "llava_onevision":
        inputs["batch_num_images"] = torch.ones(len(prompts), dtype=torch.long)
    return inputs


def _family(family: str) -> Family:
    if family not in FAMILIES:
        raise ValueError(f"no published size of {family!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _model_class(config):
    import transformers

    names = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
             "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
             "qwen3_vl": "Qwen3VLForConditionalGeneration", "qwen3_5": "Qwen3_5ForConditionalGeneration",
             "gemma3": "Gemma3ForConditionalGeneration",
             "llava_onevision": "LlavaOnevisionForConditionalGeneration",
             "internvl": "InternVLForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}
    return getattr(transformers, names[config.model_type])


def parameter_count(family: str, layers: int | None = 3) -> int:
    """Parameters of :func:`full_width`'s model, counted on the meta device (nothing allocated)."""
    config = published_config(family, layers)
    with torch.device("meta"):
        model = _model_class(config)(config)
    return sum(p.numel() for p in model.parameters())

