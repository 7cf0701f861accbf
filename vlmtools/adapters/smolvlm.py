"""SmolVLM (``SmolVLMForConditionalGeneration``): SigLIP tower, pixel shuffle, image splitting with row and
column tokens.

The processor splits an image into ``R x C`` crops of ``max_image_size`` plus a global view of the whole image
(without splitting: the global view alone) and writes, row by row, ``<fake_token_around_image><row_i_col_j>`` +
``t`` placeholders for each crop, a newline after each row, then ``\\n<fake_token_around_image><global-img>`` +
``t`` placeholders + ``<fake_token_around_image>``. Each crop and the global view is one encoder sequence; the
connector's pixel shuffle (``scale_factor``) makes each ``s x s`` square of patches one LM token: ``t`` tokens
per sub-image in raster order.

An image of the layout is one such group, its sub-images' tokens in the order the model reads them (each
crop's ``k x k`` grid row by row, then the global view's: ``tiles``, one ``(k, k)`` each; ``grid`` the first);
an image without crops is its global view. Every other token of the group (the fake tokens, row / column tokens,
the global marker, the newlines) is a layout token. The config names none of those tokens, so the groups are
read from the prompt as the processor writes it: each group ends with the run after the token that precedes the
sample's last run (the global marker).

The tower has no [CLS] token: VisionZip and FasterVLM are refused (:data:`NO_CLS`); PAINT reads the mean attention
each patch receives, put on the LM's tokens by :func:`groups_to_lm`.
"""

from __future__ import annotations

import torch

from ..layout import ImageTokens, SampleLayout, Span, TokenLayout
from .base import Adapter, span_of
from .vision import VisionEncoder, block_means, split_images

NO_CLS = ("SmolVLM's SigLIP encoder has no [CLS] token: use FastV, PDrop, SparseVLM or DART there")


def _sides(model) -> tuple[int, int]:
    """(patches per side of a sub-image, pixel-shuffle square side)."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size, model.config.scale_factor


def smolvlm_layout(model, inputs) -> TokenLayout:
    patches, block = _sides(model)
    side = patches // block
    count = side * side
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    samples = []
    for ids, keep in zip(input_ids, mask):
        real = keep.nonzero().squeeze(1)
        first = int(real[0]) if real.numel() else 0
        placeholders = ids.eq(model.config.image_token_id)
        positions = placeholders.nonzero().squeeze(1)
        if positions.numel() % count:
            raise ValueError(f"{positions.numel()} image placeholders in a prompt do not split into sub-images of "
                             f"{count} tokens: the processor (or image inputs) do not match this model")
        runs = list(positions.split(count))
        images, layout = [], []
        marker = int(ids[runs[-1][0] - 1]) if runs and int(runs[-1][0]) > 0 else None
        group: list[torch.Tensor] = []
        for run in runs:
            group.append(run)
            if int(run[0]) > 0 and int(ids[run[0] - 1]) == marker:
                image = _group(group, side)
                images.append(image)
                stop = min(int(run[-1]) + 2, len(ids))
                start = max(int(group[0][0]) - 2, first)
                span = torch.arange(start, stop)
                layout.append(span[~placeholders[start:stop]])
                group = []
        if group:
            raise ValueError("vlmtools: SmolVLM image placeholders do not end with a global view (the processor "
                             "writes one after an image's crops)")
        layout = torch.cat(layout) if layout else torch.empty(0, dtype=torch.long)
        end = int(real[-1]) + 1 if real.numel() else 0
        text_start = max([image.span.stop for image in images] + [int(layout.max()) + 1 if layout.numel() else 0,
                                                                   first])
        samples.append(SampleLayout(length=ids.numel(), images=images, text=Span(text_start, end),
                                    padding=(keep == 0).nonzero().squeeze(1), layout=layout, first=first))
    return TokenLayout(samples=samples, seq_len=input_ids.shape[1], generated_from=input_ids.shape[1])


def _group(runs: list[torch.Tensor], side: int) -> ImageTokens:
    """One image from its runs (crops row by row, then the global view), in the order the model reads them."""
    positions = torch.cat(runs)
    tiles = [(side, side)] * len(runs) if len(runs) > 1 else []
    return ImageTokens(positions=positions, grid=(side, side), span=span_of(positions), tiles=tiles)


def groups_to_lm(model, values: torch.Tensor, images) -> list[torch.Tensor]:
    """Per-patch values of every sub-image the encoder ran (an image's crops, then its global view; image after
    image) -> each image's values in its token order: the mean over each pixel-shuffle square."""
    patches, block = _sides(model)
    return split_images(block_means(values, patches, block), images)


ADAPTER = Adapter(
    family="smolvlm",
    classes=("SmolVLMForConditionalGeneration",),
    kind="vlm",
    text_layers="model.text_model.layers",
    vision_layers="model.vision_model.encoder.layers",
    layout=smolvlm_layout,
    vision=VisionEncoder(to_lm=groups_to_lm, no_cls=NO_CLS),
)
