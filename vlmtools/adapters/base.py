"""What an adapter is: a little data about one model family, plus its layout function.

An adapter names where things are (module paths, attention attribute, config keys)
and builds the :class:`~vlmtools.layout.TokenLayout` of a real batch. Adding a
family means adding one module to this package that defines ``ADAPTER``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..layout import ImageTokens, SampleLayout, Span, TokenLayout
from ..plan import AttentionSite

if TYPE_CHECKING:
    from .vision import VisionEncoder

LayoutFn = Callable[[Any, dict[str, Any]], TokenLayout]
ImageBuilder = Callable[[int, torch.Tensor], ImageTokens]
"""``build(sample, run)``: one image's :class:`ImageTokens` from its placeholder positions in ``sample``."""
VideoBuilder = Callable[[int, torch.Tensor], list[ImageTokens]]
"""``build(sample, run)``: one video's frames, each an :class:`ImageTokens`, from all its placeholder positions."""


LAYER_KINDS = ("attention", "gated_attention", "linear")
"""What a decoder layer mixes tokens with (:meth:`Adapter.kinds`)."""


@dataclass(frozen=True)
class ResidualAdd:
    """Values a family's language model adds to the residual stream between its decoder layers, outside them,
    at fixed token positions: Qwen3-VL's DeepStack adds vision-encoder features to the visual tokens after each
    of its first layers. ``module`` (dotted path from the top model) has the method ``method(hidden, mask,
    values)`` that adds ``values`` (one row per True entry of the ``(B, L)`` bool ``mask``, row-major) to
    ``hidden``; a token drop (:class:`~vlmtools.drop.DropTokens`) hands it the mask and values of the tokens
    still present."""

    module: str
    method: str


class UnsupportedModel(TypeError):
    """A model no family here knows, or a question its family cannot answer for a method; the ``vlmtools``
    command reports it as a refusal."""


@dataclass(frozen=True)
class Adapter:
    """Canonical names -> module paths for one family.

    ``text_layers`` / ``vision_layers`` are dotted paths from the top model to the
    ``ModuleList`` of blocks; ``attn`` is the attention attribute of each block;
    ``config_keys`` are the sub-configs whose attention the seam takes over
    (``""`` for the top-level config). ``letterbox(model, pixel_values)`` flags, per
    image, the content tokens that show only the padding a letterboxing processor added
    (LLaVA-1.5's ``expand2square``); the seam reads it where the pixels enter the module
    at ``vision_tower``. ``vision`` is what the methods that read inside the vision encoder
    ask of it (:class:`~vlmtools.adapters.vision.VisionEncoder`). ``layer_kinds(model)`` names each decoder
    layer's token mixer in a hybrid family (:meth:`kinds`), and ``no_attention`` says what its ``"linear"``
    layers are and what to read instead: the site of such a layer is refused with it. ``residual_adds`` are
    what the LM adds between its layers outside them (:class:`ResidualAdd`).
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
    letterbox: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    vision_tower: str | None = None
    vision: VisionEncoder | None = None
    layer_kinds: Callable[[Any], Sequence[str]] | None = None
    no_attention: str = ""
    residual_adds: tuple[ResidualAdd, ...] = ()

    def kinds(self, model: torch.nn.Module) -> list[str]:
        """Each decoder layer's token mixer: ``"attention"`` (softmax attention, a site ``text.{i}``),
        ``"gated_attention"`` (softmax attention whose output a sigmoid gate scales: a site too) or
        ``"linear"`` (no attention map, no site: Qwen3.5's Gated DeltaNet layers). ``layer_kinds(model)``
        says it for a hybrid family; None: every layer is ``"attention"``."""
        count = len(self.blocks(model, "text"))
        kinds = ["attention"] * count if self.layer_kinds is None else list(self.layer_kinds(model))
        if len(kinds) != count or set(kinds) - set(LAYER_KINDS):
            raise ValueError(f"the {self.family} adapter's layer_kinds gave {kinds} for {count} decoder layers; "
                             f"each must be one of {LAYER_KINDS}")
        return kinds

    def attention_layers(self, model: torch.nn.Module) -> list[int]:
        """The decoder layers with softmax attention (each a site ``text.{i}``)."""
        return [i for i, kind in enumerate(self.kinds(model)) if kind != "linear"]

    def vision_encoder(self) -> VisionEncoder:
        """:attr:`vision`, or :class:`UnsupportedModel` saying the family does not describe its encoder."""
        if self.vision is None:
            raise UnsupportedModel(f"the {self.family} adapter does not say how its vision encoder's tokens become "
                                   "LM tokens (Adapter.vision)")
        return self.vision

    def blocks(self, model: torch.nn.Module, stream: str = "text") -> list[torch.nn.Module]:
        path = self.text_layers if stream == "text" else self.vision_layers
        if path is None:
            return []
        return list(model.get_submodule(path))

    def sites(self, model: torch.nn.Module) -> list[AttentionSite]:
        """Every attention module of the text (and vision) stack, named ``{stream}.{i}`` (a hybrid family's
        text layers without attention have none)."""
        sites = []
        attention = set(self.attention_layers(model))
        for stream, attr in (("text", self.attn), ("vision", self.vision_attn)):
            for index, block in enumerate(self.blocks(model, stream)):
                if stream == "text" and index not in attention:
                    continue
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


def span_of(positions: torch.Tensor) -> Span:
    return Span(int(positions[0]), int(positions[-1]) + 1)


def sequence_layout(inputs, image_token_id: int, images: Iterable[tuple[int, ImageBuilder]],
                    layout_ids: tuple[int, ...] = (),
                    videos: tuple[int, Iterable[tuple[int, VideoBuilder]]] | None = None) -> TokenLayout:
    """Layout of a left- or right-padded batch in which images are placeholder runs.

    ``images`` yields ``(placeholders, build)`` for every image of the batch in order
    (sample by sample, as the model consumes its image inputs); each sample's
    placeholders are split into consecutive images accordingly. ``layout_ids`` are
    token ids that carry no content (e.g. vision start/end); they join the images'
    own layout positions (e.g. LLaVA-NeXT newlines) in the sample's ``layout``.
    ``videos``: ``(video_token_id, videos)`` where videos are placeholder runs of their own id
    (Qwen3-VL); ``videos`` yields ``(placeholders, build)`` per video as ``images`` does, and
    ``build`` returns the video's frames, which join the sample's images in sequence order.
    """
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    images = iter(images)
    video_runs = iter(videos[1]) if videos is not None else None
    samples = []
    for ids, keep in zip(input_ids, mask):
        real = keep.nonzero().squeeze(1)
        runs = _split(ids.eq(image_token_id).nonzero().squeeze(1), images)
        found = [build(len(samples), run) for build, run in runs]
        if videos is not None:
            for build, run in _split(ids.eq(videos[0]).nonzero().squeeze(1), video_runs):
                found += build(len(samples), run)
            found.sort(key=lambda image: image.span.start)
        layout = torch.isin(ids, torch.tensor(layout_ids, dtype=ids.dtype)).nonzero().squeeze(1)
        layout = torch.cat([layout] + [image.layout for image in found]).unique()  # sorted, each once
        content_end = int(real[-1]) + 1 if real.numel() else 0
        text_start = max([image.span.stop for image in found] + [int(layout.max()) + 1 if layout.numel() else 0,
                                                                  int(real[0]) if real.numel() else 0])
        samples.append(SampleLayout(length=ids.numel(), images=found, text=Span(text_start, content_end),
                                    padding=(keep == 0).nonzero().squeeze(1), layout=layout,
                                    first=int(real[0]) if real.numel() else 0))
    return TokenLayout(samples=samples, seq_len=input_ids.shape[1], generated_from=input_ids.shape[1])


def encoded_images(inputs) -> list[torch.Tensor]:
    """Per-image features passed as ``mm_encoder_outputs`` instead of pixel inputs.

    ``generate`` (transformers 5) runs the vision encoder before the prefill and hands
    the model these features, dropping the pixel inputs and their sizes
    (``image_sizes``, ``image_grid_thw``): a layout must then read the images from them.
    """
    encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
    return [] if encoded is None else list(encoded.pooler_output)


def _split(positions: torch.Tensor, images: Iterator[tuple[int, ImageBuilder]]):
    start = 0
    while start < positions.numel():
        count, build = next(images, (None, None))
        if count is None or start + count > positions.numel():
            raise ValueError(f"{positions.numel()} image placeholders in a prompt do not split into its images' "
                             "token counts: the processor (or image inputs) do not match this model")
        yield build, positions[start:start + count]
        start += count
