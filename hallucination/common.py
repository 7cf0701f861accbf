"""What the three redistribution methods share: key masks built from the prompt layout.

Methods decide at prefill which prompt positions are visual, sinks, salient or
question tokens, per sample (left padding shifts them), as ``(B, L)`` boolean masks
over the prompt; a decoding step's keys are the prompt plus the tokens generated so
far, which are none of these, so a mask only ever needs widening with False. Where a token drop
(a pruning host) shortened a layer, its keys are the kept prompt positions then the generated
tokens: :func:`keys_of` reads a mask at those original positions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmtools.layout import TokenLayout
from vlmtools.plan import key_positions


def key_mask(per_sample: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """``(B, width)`` bool, True at each sample's listed positions."""
    mask = torch.zeros(len(per_sample), width, dtype=torch.bool)
    for b, positions in enumerate(per_sample):
        mask[b, positions.long()] = True
    return mask


def visual_mask(layout: TokenLayout) -> torch.Tensor:
    """``(B, L)`` True on every image content token (never on newlines or vision start/end)."""
    layout.require_images()
    return key_mask([sample.visual_positions() for sample in layout.samples], layout.seq_len)


def widen(mask: torch.Tensor, k_len: int, device=None) -> torch.Tensor:
    """A prompt mask ``(B, L)`` extended to ``k_len`` keys: generated tokens are False."""
    if mask.shape[-1] < k_len:
        mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], k_len - mask.shape[-1])], -1)
    return mask[..., :k_len].to(device)


def keys_of(mask: torch.Tensor, state, layer: int, k_len: int, device=None) -> torch.Tensor:
    """A prompt mask ``(B, L)`` over original positions, read at the ``k_len`` keys of decoder layer ``layer``:
    where a token drop shortened that layer, its keys are the kept prompt positions, then the generated tokens
    (:func:`vlmtools.plan.key_positions`); otherwise :func:`widen`."""
    positions = key_positions(state, layer, k_len)
    if positions is None:
        return widen(mask, k_len, device)
    positions = positions.to(mask.device)
    wide = widen(mask, int(positions.max()) + 1, mask.device)
    return wide.expand(positions.shape[0], -1).gather(1, positions).to(device)
