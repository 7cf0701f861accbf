"""RefAM: zero-shot referring segmentation from a diffusion transformer's joint attention."""

from .maps import MapAccumulator, RecordImageText
from .method import RefAM, RefAMSettings, Segmentation, default_blocks
from .prompt import DEFAULT_MAGNETS, PromptTokens, build_prompt
from .source import EncodedPrompt, source_for

__all__ = [
    "DEFAULT_MAGNETS",
    "EncodedPrompt",
    "MapAccumulator",
    "PromptTokens",
    "RecordImageText",
    "RefAM",
    "RefAMSettings",
    "Segmentation",
    "build_prompt",
    "default_blocks",
    "source_for",
]
