"""Loading a VLM by zoo name or folder, and turning images and questions into its inputs."""
from __future__ import annotations

from pathlib import Path


def load_vlm(name_or_path: str):
    """(model, processor) for a zoo VLM (``llava-shapes``) or a Hugging Face folder."""
    import vlmtools_zoo as zoo

    if name_or_path in zoo.MODELS:
        loaded = zoo.load(name_or_path)
        if not isinstance(loaded, tuple):
            raise ValueError(f"{name_or_path} is a DiT, not a VLM; the VLMs are: "
                             + ", ".join(m for m in zoo.MODELS if m != "flux-shapes"))
        return loaded
    if not Path(name_or_path).exists():
        raise FileNotFoundError(f"{name_or_path!r} is neither a zoo model ({', '.join(zoo.MODELS)}) nor a model folder")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(name_or_path).eval(), AutoProcessor.from_pretrained(name_or_path)


def chat_inputs(processor, images: list, questions: list[str], device=None) -> dict:
    """A left-padded batch: one image then one question per user turn, through the processor's chat template."""
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return {key: value.to(device) if device is not None else value for key, value in batch.items()}


def held_out_prompts(processor, count: int, device=None):
    """Chat inputs, one prompt each, of the zoo world's first ``count`` val questions (``qa_items``): the
    held-out prompts that calibrations fit on, never an evaluation's ``test`` ones."""
    from vlmtools_zoo import world

    return (chat_inputs(processor, [world.scene("val", i).image], [q.question], device)
            for i, q in world.qa_items("val", count))


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
