"""Tiny random-weight VLMs of the real transformers classes, with a matching batch.

Each builder returns ``(model, inputs)``: an fp32 model in eval mode and a batch of
two prompts with LEFT padding (pad id 0), different image sizes where the family
allows it, and pixel inputs from the family's real image processor where one can be
built offline. Token ids: 1..5 text, then the family's special ids near the top of
a 120-token vocabulary. Builders seed torch, so two calls give the same weights.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

VOCAB = 120
IMAGE = 110
VISION_START, VISION_END, VIDEO = 112, 113, 111

_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
}
_QWEN_TEXT = _LLAMA | {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
}
_QWEN_IDS = {
    "image_token_id": IMAGE,
    "video_token_id": VIDEO,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}


def _images(*shapes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def left_padded(prompts: list[list[int]]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of prompts left-padded with id 0."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def _ready(model):
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def tiny_llava():
    """LLaVA-1.5: CLIP 32px / patch 8 (16 tokens per image), Llama with GQA."""
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_CLIP), text_config=LlamaConfig(**_LLAMA), image_token_id=IMAGE
    )
    model = _ready(LlavaForConditionalGeneration(config))
    inputs = left_padded([[1, 2] + [IMAGE] * 16 + [3, 4, 5], [1] + [IMAGE] * 16 + [3, 4]])
    inputs["pixel_values"] = torch.randn(2, 3, 32, 32)
    return model, inputs


def tiny_llava_next():
    """LLaVA-NeXT: 32px tiles, anyres up to 64x64; a wide and a tall image (34 and 40 placeholders)."""
    torch.manual_seed(0)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_CLIP),
        text_config=LlamaConfig(**_LLAMA),
        image_token_id=IMAGE,
        image_grid_pinpoints=pinpoints,
    )
    model = _ready(LlavaNextForConditionalGeneration(config))
    processor = LlavaNextImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints
    )
    pixels = processor(images=_images((16, 64), (64, 16)), return_tensors="pt")
    inputs = left_padded([[1, 2] + [IMAGE] * 34 + [3, 4, 5], [1] + [IMAGE] * 40 + [3, 4]])
    return model, {**inputs, "pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}


def _qwen_inputs(shapes):
    processor = Qwen2VLImageProcessor(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=32 * 32
    )
    pixels = processor(images=_images(*shapes), return_tensors="pt")
    counts = (pixels["image_grid_thw"].prod(-1) // 4).tolist()
    inputs = left_padded(
        [
            [1, VISION_START] + [IMAGE] * counts[0] + [VISION_END, 3, 4, 5],
            [1, 2, VISION_START] + [IMAGE] * counts[1] + [VISION_END, 3],
        ]
    )
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE).int()
    return {**inputs, "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}


def tiny_qwen2_vl():
    """Qwen2-VL: patch 4, merge 2; a 16x24 and a 32x32 image (6 and 16 placeholders)."""
    torch.manual_seed(0)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 4,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "mlp_ratio": 2,
    }
    model = _ready(
        Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=_QWEN_TEXT, vision_config=vision, **_QWEN_IDS))
    )
    return model, _qwen_inputs([(16, 24), (32, 32)])


def tiny_qwen2_5_vl():
    """Qwen2.5-VL: as Qwen2-VL, vision block 0 windowed (16px windows), block 1 full attention."""
    torch.manual_seed(0)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "out_hidden_size": 64,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": 4,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 16,
        "fullatt_block_indexes": [1],
    }
    model = _ready(
        Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=_QWEN_TEXT, vision_config=vision, **_QWEN_IDS))
    )
    return model, _qwen_inputs([(16, 24), (32, 32)])


_QWEN3_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "out_hidden_size": 64,
    "intermediate_size": 64,
    "num_heads": 4,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "num_position_embeddings": 16,
}


def tiny_qwen3_vl():
    """Qwen3-VL: as Qwen2-VL's batch; interleaved M-RoPE; DeepStack adds vision blocks 0 and 1's merged
    features to the visual tokens after LM layers 0 and 1."""
    torch.manual_seed(0)
    text = _QWEN_TEXT | {"head_dim": 16, "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2],
                                                             "mrope_interleaved": True, "rope_theta": 10000.0}}
    vision = _QWEN3_VISION | {"deepstack_visual_indexes": [0, 1]}
    model = _ready(Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **_QWEN_IDS)))
    return model, _qwen_inputs([(16, 24), (32, 32)])


def tiny_qwen3_5():
    """Qwen3.5: 8 LM layers in its pattern (Gated DeltaNet x3, then gated full attention: layers 3 and 7 have
    attention), partial M-RoPE (a quarter of each 32-wide head); Qwen2-VL's batch."""
    torch.manual_seed(0)
    text = _QWEN_TEXT | {
        "num_hidden_layers": 8, "head_dim": 32, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                            "rope_theta": 10000.0, "partial_rotary_factor": 0.25}}
    model = _ready(Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=_QWEN3_VISION,
                                                                 **_QWEN_IDS)))
    return model, _qwen_inputs([(16, 24), (32, 32)])


BUILDERS = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_5": tiny_qwen3_5,
}
"""Family name -> builder, for tests that run on every family."""
