"""The zoo: a deterministic shapes world and small models trained on it.

``load(name)`` returns ``(model, processor)`` for a VLM or the pipeline for
the DiT, assembling the full Hugging Face folder in the cache
(``$VLMTOOLS_CACHE`` or ``~/.cache/vlmtools``) from the pip-installed SmolLM2
and the trained parts shipped under ``vlmtools_zoo/weights/<name>/``.
"""
from __future__ import annotations

from importlib import import_module
from pathlib import Path

from . import world
from .lm import cache_dir
from .world import scene

MODULES = {"llava-shapes": "llava", "qwen2vl-shapes": "qwen2vl", "flux-shapes": "flux"}
MODELS = tuple(MODULES)


def load(name: str, folder: Path | None = None, weights: Path | None = None):
    """``(model, processor)`` for a zoo VLM, the pipeline for the DiT. ``folder``: where to assemble
    it (default: the cache); ``weights``: a folder of trained parts in the shipped layout to use
    instead of the package's own (e.g. a training run's export), assembled by default in
    ``<cache>/evaluate/<name>``, beside, never over, the package's own folder."""
    if name not in MODELS:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(MODELS)}")
    module = import_module(f".{MODULES[name]}", __name__)
    if not weights:
        return module.load(folder)
    return module.load(folder or cache_dir() / "evaluate" / name, weights=weights)


__all__ = ["MODELS", "load", "scene", "world"]
