"""Tiny random-weight models of every supported family, built from the real transformers / diffusers
classes, with matching inputs: for tests of code that wraps them (this project's and yours).

>>> from vlmtools.testing import BUILDERS
>>> model, inputs = BUILDERS["llava"]()          # fp32, eval mode, a left-padded batch of two
>>> from vlmtools.testing import full_width      # a family at its published width (random weights, 3 LM layers)
>>> model, inputs = full_width("gemma3")
>>> from vlmtools.testing import tiny_flux       # diffusers is imported on first use
>>> transformer, kwargs = tiny_flux()
"""
from __future__ import annotations

from importlib import import_module

from .published import full_width, published_config, published_inputs
from .vlm import (BUILDERS, IMAGE, VOCAB, left_padded, tiny_gemma3, tiny_internvl, tiny_llava, tiny_llava_next,
                  tiny_llava_onevision, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_5, tiny_qwen3_vl, tiny_smolvlm)

_LAZY = {"tiny_flux": "dit", "tiny_sd3": "dit", "tiny_flux2": "dit", "tiny_qwen_image": "dit", "tiny_mochi": "dit",
         "tiny_wan": "dit", "published_dit": "dit", "GRID": "dit", "TEXT": "dit", "FRAMES": "dit",
         "tiny_flux_pipeline": "pipelines", "tiny_sd3_pipeline": "pipelines", "tiny_wan_pipeline": "pipelines",
         "tiny_mochi_pipeline": "pipelines", "tiny_flux2_pipeline": "pipelines", "tiny_qwen_image_pipeline": "pipelines",
         "tiny_flux2_klein_pipeline": "pipelines",
         "tiny_tokenizer": "pipelines"}
"""Names whose modules import diffusers: loaded when first asked for."""


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BUILDERS", "IMAGE", "VOCAB", "left_padded", "tiny_llava", "tiny_llava_next", "tiny_qwen2_5_vl",
           "tiny_qwen2_vl", "tiny_qwen3_5", "tiny_qwen3_vl", "tiny_gemma3", "tiny_llava_onevision", "tiny_internvl",
           "tiny_smolvlm", "full_width", "published_config", "published_inputs", *_LAZY]
