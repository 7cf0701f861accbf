"""qwen2vl-shapes, first part: SmolLM2 ported into Qwen2-VL's text model.

Qwen2-VL's text model is Llama-shaped except for q/k/v biases (set to zero
here) and multimodal RoPE, which on text-only input (equal t/h/w positions)
reduces to SmolLM2's 1-D RoPE. ``port()`` returns a
``Qwen2VLForConditionalGeneration`` whose text-only logits match SmolLM2's
(tested within 1e-4). The vision tower is built but not trained yet (see
docs/zoo.md).
"""
from __future__ import annotations

import torch

from .lm import smollm2_dir

MROPE_SECTION = [8, 12, 12]  # sums to head_dim / 2 = 32


def build_config():
    from transformers import AutoConfig, Qwen2VLConfig

    src = AutoConfig.from_pretrained(smollm2_dir())
    text = dict(vocab_size=src.vocab_size, hidden_size=src.hidden_size,
                intermediate_size=src.intermediate_size, num_hidden_layers=src.num_hidden_layers,
                num_attention_heads=src.num_attention_heads,
                num_key_value_heads=src.num_key_value_heads, hidden_act=src.hidden_act,
                max_position_embeddings=src.max_position_embeddings, rms_norm_eps=src.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": src.rope_parameters["rope_theta"],
                                 "mrope_section": MROPE_SECTION},
                bos_token_id=src.bos_token_id, eos_token_id=src.eos_token_id,
                pad_token_id=src.pad_token_id)
    vision = dict(depth=4, embed_dim=192, hidden_size=src.hidden_size, num_heads=4, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         image_token_id=16, video_token_id=15, vision_start_token_id=13,
                         vision_end_token_id=14)


@torch.no_grad()
def port():
    """Qwen2VLForConditionalGeneration with SmolLM2's weights (zero q/k/v biases)."""
    from transformers import LlamaForCausalLM, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration(build_config())
    src = LlamaForCausalLM.from_pretrained(smollm2_dir()).model.state_dict()
    lm = model.model.language_model
    missing, unexpected = lm.load_state_dict(src, strict=False)
    assert not unexpected and all(k.endswith(".bias") for k in missing), (missing, unexpected)
    for k in missing:
        lm.get_parameter(k).zero_()
    model.lm_head.weight = lm.embed_tokens.weight
    return model.eval()
