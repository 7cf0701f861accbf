"""Loading a VLM by zoo name or folder, and the held-out zoo prompts calibrations fit on."""
from __future__ import annotations

from pathlib import Path

from vlmtools.chat import chat_inputs


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


def held_out_prompts(processor, count: int, device=None):
    """Chat inputs, one prompt each, of the zoo world's first ``count`` val questions (``qa_items``): the
    held-out prompts that calibrations fit on, never an evaluation's ``test`` ones."""
    from vlmtools_zoo import world

    return (chat_inputs(processor, [world.scene("val", i).image], [q.question], device)
            for i, q in world.qa_items("val", count))
