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


_SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "image_size": 32, "patch_size": 4}
_QWEN2 = {"model_type": "qwen2", "bos_token_id": 1, "eos_token_id": 2}
NEWLINE, ROW_COL = 7, 90
"""SmolVLM's newline and first row / column token in the tiny vocabulary."""


def tiny_gemma3():
    """Gemma 3: SigLIP 32px / patch 4 pooled 2x2 to 16 tokens per image; LM layers alternate sliding-window
    (window 12, shorter than the prompts) and full attention; image tokens attend to each other both ways
    (``token_type_ids``). Pan-and-scan: a wide image is the image and its 2 crops (three runs of 16), a square one
    a single run."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor

    torch.manual_seed(0)
    text = _LLAMA | {"model_type": "gemma3_text", "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 12,
                     "sliding_window_pattern": 2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    config = Gemma3Config(text_config=text, vision_config=_SIGLIP | {"vision_use_head": False}, mm_tokens_per_image=16,
                          image_token_index=IMAGE, boi_token_index=VISION_START, eoi_token_index=VISION_END)
    model = _ready(Gemma3ForConditionalGeneration(config))
    with torch.no_grad():  # transformers initialises the projection to zeros: every image would be the same tokens
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02)
    processor = Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=True,
                                     pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=2,
                                     pan_and_scan_min_ratio_to_activate=1.2)
    pixels = processor(images=_images((16, 40), (32, 32)), return_tensors="pt")
    views = [1 + n for n in pixels["num_crops"].tolist()]
    image = [VISION_START] + [IMAGE] * 16 + [VISION_END]
    inputs = left_padded([[1, 2] + image * views[0] + [3, 4, 5], [1] + image * views[1] + [3, 4]])
    inputs["token_type_ids"] = (inputs["input_ids"] == IMAGE).long()
    return model, {**inputs, "pixel_values": pixels["pixel_values"]}


def tiny_llava_onevision(video: bool = False):
    """LLaVA-OneVision: SigLIP 32px / patch 8 (4x4 per tile), anyres up to 64x64, "anyres_max_2": a wide image
    (base 16 + 2 rows of 8 + newlines = 34 placeholders) and a square one whose 8x8 stitched grid is resized to
    5x5 (16 + 30 = 46). ``video``: the second prompt also holds a 3-frame video (2x2 tokens a frame, then one
    newline: 13 placeholders)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor

    torch.manual_seed(0)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        vision_config=_SIGLIP | {"patch_size": 8, "vision_use_head": False}, text_config=_LLAMA | _QWEN2,
        image_token_index=IMAGE, video_token_index=VIDEO, image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_2")
    model = _ready(LlavaOnevisionForConditionalGeneration(config))
    processor = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    pixels = processor(images=_images((16, 64), (64, 64)), return_tensors="pt")
    clip = [VIDEO] * 13 + [6] if video else []
    inputs = left_padded([[1, 2] + [IMAGE] * 34 + [3, 4, 5], [1] + [IMAGE] * 46 + clip + [3, 4]])
    inputs.update(pixel_values=pixels["pixel_values"], image_sizes=pixels["image_sizes"])
    if video:
        inputs["pixel_values_videos"] = torch.randn(1, 3, 3, 32, 32)
    return model, inputs


def tiny_internvl():
    """InternVL: InternViT 32px / patch 4 with [CLS], pixel shuffle 0.5 (16 tokens per tile); a wide image in 3
    tiles plus its thumbnail and a square one in one tile, each run between markers (112, 113)."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 4}
    config = InternVLConfig(vision_config=vision, text_config=_LLAMA | _QWEN2, image_token_id=IMAGE,
                            image_seq_length=16)
    model = _ready(InternVLForConditionalGeneration(config))
    processor = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                      max_patches=6)
    pixels = processor(images=_images((32, 96), (32, 32)), return_tensors="pt")
    tiles = pixels["num_patches"].tolist()
    run = lambda n: [VISION_START] + [IMAGE] * 16 * n + [VISION_END]  # noqa: E731
    inputs = left_padded([[1, 2] + run(tiles[0]) + [3, 4, 5], [1] + run(tiles[1]) + [3, 4]])
    return model, {**inputs, "pixel_values": pixels["pixel_values"]}


def _smolvlm_prompt(rows: int, cols: int, tokens: int) -> list[int]:
    """An image as SmolVLM's processor writes it (fake token 112, global marker 113, row / column tokens 90..)."""
    out = []
    for i in range(rows):
        for j in range(cols):
            out += [VISION_START, ROW_COL + i * cols + j] + [IMAGE] * tokens
        out += [NEWLINE]
    return out + [NEWLINE, VISION_START, VISION_END] + [IMAGE] * tokens + [VISION_START]


def tiny_smolvlm():
    """SmolVLM: SigLIP 32px / patch 4, pixel shuffle 2 (16 tokens per sub-image); image splitting: a wide image
    in 1 x 2 crops and a tall one in 2 x 2, each followed by its global view."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor

    torch.manual_seed(0)
    vision = {k: v for k, v in _SIGLIP.items() if k != "model_type"}
    config = SmolVLMConfig(vision_config=vision, text_config=_LLAMA | {"model_type": "llama"}, image_token_id=IMAGE,
                           scale_factor=2)
    model = _ready(SmolVLMForConditionalGeneration(config))
    processor = SmolVLMImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                      do_image_splitting=True)
    pixels = processor(images=[[image] for image in _images((24, 64), (64, 48))], return_tensors="pt",
                       return_row_col_info=True)
    (rows0,), (rows1,) = pixels["rows"]
    (cols0,), (cols1,) = pixels["cols"]
    inputs = left_padded([[1, 2] + _smolvlm_prompt(rows0, cols0, 16) + [3, 4, 5],
                          [1] + _smolvlm_prompt(rows1, cols1, 16) + [3, 4]])
    return model, {**inputs, "pixel_values": pixels["pixel_values"],
                   "pixel_attention_mask": pixels["pixel_attention_mask"]}


BUILDERS = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_5": tiny_qwen3_5,
    "gemma3": tiny_gemma3,
    "llava_onevision": tiny_llava_onevision,
    "internvl": tiny_internvl,
    "smolvlm": tiny_smolvlm,
}
"""Family name -> builder, for tests that run on every family."""
