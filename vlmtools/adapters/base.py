"""What an adapter is: a little data about one model family, plus its layout function.

An adapter names where things are (module paths, attention attribute, config keys)
and builds the :class:`~vlmtools.layout.TokenLayout` of a real batch. Adding a
family means adding one module to this package that defines ``ADAPTER``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from ..layout import TokenLayout
from ..plan import AttentionSite

LayoutFn = Callable[[Any, dict[str, Any]], TokenLayout]


@dataclass(frozen=True)
class Adapter:
    """Canonical names -> module paths for one family.

    ``text_layers`` / ``vision_layers`` are dotted paths from the top model to the
    ``ModuleList`` of blocks; ``attn`` is the attention attribute of each block;
    ``config_keys`` are the sub-configs whose attention the seam takes over
    (``""`` for the top-level config).
    """

    family: str
    classes: tuple[str, ...]
    kind: Literal["vlm", "dit"]
    text_layers: str
    attn: str = "self_attn"
    vision_layers: str | None = None
    vision_attn: str = "self_attn"
    config_keys: tuple[str, ...] = ("text_config", "vision_config")
    layout: LayoutFn | None = None

    def matches(self, model: torch.nn.Module) -> bool:
        return type(model).__name__ in self.classes

    def blocks(self, model: torch.nn.Module, stream: str = "text") -> list[torch.nn.Module]:
        path = self.text_layers if stream == "text" else self.vision_layers
        if path is None:
            return []
        return list(model.get_submodule(path))

    def sites(self, model: torch.nn.Module) -> list[AttentionSite]:
        """Every attention module of the text (and vision) stack, named ``{stream}.{i}``."""
        sites = []
        for stream, attr in (("text", self.attn), ("vision", self.vision_attn)):
            for index, block in enumerate(self.blocks(model, stream)):
                module = getattr(block, attr)
                sites.append(_site(stream, index, module))
        return sites


def _site(stream: str, index: int, module: torch.nn.Module) -> AttentionSite:
    config = module.config
    heads = getattr(config, "num_attention_heads", None) or config.num_heads
    head_dim = getattr(module, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return AttentionSite(name=f"{stream}.{index}", stream=stream, index=index, module=module,
                         heads=heads, kv_heads=kv_heads, head_dim=head_dim)
