"""The zoo: a deterministic shapes world and small models trained on it.

``load(name)`` returns ``(model, processor)`` for a VLM or the pipeline for
the DiT, assembling the full Hugging Face folder in the cache
(``$VLMTOOLS_CACHE`` or ``~/.cache/vlmtools``) from the pip-installed SmolLM2
and the trained parts shipped under ``vlmtools/zoo/weights/<name>/``.
"""
from __future__ import annotations

from . import world
from .world import scene

MODELS = ("llava-shapes", "qwen2vl-shapes", "flux-shapes")


def load(name: str):
    if name == "llava-shapes":
        from .llava import load as load_llava

        return load_llava()
    if name == "qwen2vl-shapes":
        from .qwen2vl import load as load_qwen2vl

        return load_qwen2vl()
    if name == "flux-shapes":
        from .flux import load as load_flux

        return load_flux()
    raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(MODELS)}")


__all__ = ["MODELS", "load", "scene", "world"]
