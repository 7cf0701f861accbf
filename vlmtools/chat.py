"""Chat-template batches of (image, question) pairs and their greedy answers, for any wrapped VLM."""
from __future__ import annotations


def chat_inputs(processor, images: list, questions: list[str], device=None) -> dict:
    """A left-padded batch: one image then one question per user turn, through the processor's chat template."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return {key: value.to(device) if device is not None else value for key, value in batch.items()}


def greedy(vlm, inputs: dict, *interventions, max_new_tokens: int = 4) -> list[str]:
    """The decoded greedy continuation of each prompt of ``inputs``, with ``interventions`` in use."""
    import torch

    with torch.no_grad(), vlm.use(*interventions):
        out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return vlm.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def first_word(text: str) -> str:
    """A one-word answer as scored: the text's first word, lower case, without trailing punctuation."""
    words = text.strip().lower().split()
    return words[0].strip(".,") if words else ""
