"""RefAM: zero-shot referring segmentation from a diffusion transformer's joint attention."""

from vlmtools.adapters.dit_source import EncodedPrompt

from .maps import MapAccumulator, RecordImageText
from .method import RefAM, RefAMSettings, Segmentation, default_blocks
from .prompt import DEFAULT_MAGNETS, PromptTokens, build_prompt
from .source import register_source, source_for

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
    "register_source",
    "source_for",
]
