"""A random-weight checkpoint folder with a zoo processor, for commands that take ``--model PATH``."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from vlmtools.testing.vlm import _CLIP, _LLAMA, _ready


def tiny_llava_folder(folder) -> str:
    """A random LLaVA-1.5 with llava-shapes' processor (SmolLM2 tokenizer, 96 px letterboxed images, 144
    visual tokens) saved as a Hugging Face folder, for commands that take ``--model PATH``."""
    from vlmtools_zoo import llava

    processor = llava.build_processor()
    torch.manual_seed(0)
    vision = CLIPVisionConfig(**{**_CLIP, "image_size": llava.IMAGE_SIZE, "patch_size": llava.PATCH})
    text = LlamaConfig(**{**_LLAMA, "num_hidden_layers": 6, "vocab_size": len(processor.tokenizer)})
    image_token = processor.tokenizer.convert_tokens_to_ids(llava.IMAGE_TOKEN)
    model = _ready(LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                             image_token_id=image_token, image_seq_length=144,
                                                             tie_word_embeddings=True)))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
