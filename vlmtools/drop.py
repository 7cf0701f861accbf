"""Dropping tokens for real from a decoder layer on (the runtime under pruning).

From the first drop layer on, every layer sees only the kept tokens: hidden states
are sliced at each drop layer, and each layer's own inputs, which the model computed
for the full prompt, are gathered to the kept positions: rotary ``position_embeddings``
(so each token keeps its original position, all M-RoPE rows included), ``position_ids``
and the 4-D attention mask (rows and columns, so left padding stays masked). Keys and
values of dropped tokens never enter that layer's KV cache. During cached decoding the
mask's key columns are gathered to the kept prompt positions plus every generated one.

The cache layers of pruned layers report their *virtual* length (kept + dropped):
transformers derives new tokens' positions and mask sizes from the cache length, and
those must stay those of the unpruned sequence.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import DynamicLayer

from .plan import ForwardState, LayerHook, Plan

Chooser = Callable[[ForwardState, torch.Tensor, torch.Tensor],
                   torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
"""``chooser(state, hidden, kept)`` -> the positions to keep, a ``(B, n)`` subset of ``kept``.

``kept`` holds the original positions still present (``(B, L)`` before the first drop),
``hidden`` the residual stream entering the drop layer (one row per kept position).
A chooser that merges tokens (VisionZip, SparseVLM recycling) returns
``(positions, hidden_of_kept)`` instead: ``(B, n, D)`` rows, in the order of ``positions``,
that replace the kept tokens' residual stream.
"""


class PrunedCacheLayer(DynamicLayer):
    """A KV-cache layer that holds fewer tokens than the sequence it stands for."""

    def __init__(self, dropped: int):
        super().__init__()
        self.dropped = dropped

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.dropped


class DropTokens:
    """Intervention: at each ``layer`` of ``stages`` keep only what its chooser picks.

    What one block kept is its :class:`DropRun`, ``trace[drop]``:

    >>> drop = DropTokens({2: keep_first_half})
    >>> with vlm.use(drop) as trace:
    ...     model.generate(**inputs)
    >>> trace[drop].kept_at(2)          # (B, n) original positions present in layer 2
    """

    def __init__(self, stages: dict[int, Chooser]):
        if not stages or min(stages) < 0:
            raise ValueError("stages must map decoder-layer indices >= 0 to choosers")
        self.stages = dict(sorted(stages.items()))

    def attach(self, vlm, plan: Plan) -> DropRun:
        first = min(self.stages)
        if first >= vlm.num_layers:
            raise ValueError(f"drop layer {first} >= the model's {vlm.num_layers} decoder layers")
        run = plan.trace[self] = DropRun(self.stages, plan.state)
        for index in range(first, vlm.num_layers):
            plan.layer(index, vlm.layers[index], run)
        return run


class DropRun(LayerHook):
    """One block of :class:`DropTokens`: the hook on its layers and what each drop layer kept."""

    def __init__(self, stages: dict[int, Chooser], state: ForwardState):
        self.stages, self.state = stages, state
        self.kept: dict[int, torch.Tensor] = {}
        """Drop layer -> original positions it kept at the latest prefill, ``(B, n)``."""
        self.prompt_len = 0

    def kept_at(self, index: int) -> torch.Tensor:
        """Original positions present in layer ``index`` during the last prefill, ``(B, n)``."""
        return self.kept[max(layer for layer in self.kept if layer <= index)]

    def before_layer(self, index, hidden, kwargs):
        if self.state.step == 0 and index == min(self.stages):
            self.kept = {}
            self.prompt_len = hidden.shape[1]
        if self.state.step == 0:
            hidden = self._prefill_drop(index, hidden)
            kept = self.kept_at(index)
            kwargs = {**kwargs, **_gather_inputs(kwargs, kept, rows=True)}
            _mark_cache(kwargs.get("cache", kwargs.get("past_key_values")), index, self.prompt_len - kept.shape[1])
        else:
            kept = self.kept_at(index)
            batch = kept.shape[0]
            total = kwargs["attention_mask"].shape[-1] if kwargs.get("attention_mask") is not None else None
            if total is not None:
                generated = torch.arange(self.prompt_len, total, device=kept.device).expand(batch, -1)
                columns = torch.cat([kept, generated], 1)
                kwargs = {**kwargs, "attention_mask": _gather_mask(kwargs["attention_mask"], None, columns)}
        return hidden, kwargs

    def _prefill_drop(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if index not in self.stages:
            return hidden
        batch = hidden.shape[0]
        before = self.kept_at(index) if self.kept else torch.arange(hidden.shape[1], device=hidden.device).expand(batch, -1)
        choice = self.stages[index](self.state, hidden, before)
        keep, merged = choice if isinstance(choice, tuple) else (choice, None)
        if keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] == 0:
            raise ValueError(f"chooser at layer {index} must return (batch, n >= 1) positions, got {tuple(keep.shape)}")
        if merged is not None and merged.shape != (*keep.shape, hidden.shape[-1]):
            raise ValueError(f"chooser at layer {index} returned hidden states {tuple(merged.shape)} for "
                             f"{tuple(keep.shape)} positions; expected {(*keep.shape, hidden.shape[-1])}")
        keep, order = keep.sort(1)
        relative = torch.searchsorted(before.contiguous(), keep)
        if not torch.equal(before.gather(1, relative.clamp(max=before.shape[1] - 1)), keep):
            raise ValueError(f"chooser at layer {index} returned positions that were already dropped")
        self.kept[index] = keep
        if merged is not None:
            return merged.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1])).to(hidden.dtype)
        return hidden.gather(1, relative[..., None].expand(-1, -1, hidden.shape[-1]))


def _gather_inputs(kwargs: dict[str, Any], kept: torch.Tensor, rows: bool) -> dict[str, Any]:
    out = {}
    cos_sin = kwargs.get("position_embeddings")
    if cos_sin is not None:
        out["position_embeddings"] = tuple(_gather_seq(t, kept) for t in cos_sin)
    ids = kwargs.get("position_ids")
    if ids is not None:
        out["position_ids"] = _gather_positions(ids, kept)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        out["attention_mask"] = _gather_mask(mask, kept if rows else None, kept)
    return out


def _gather_seq(t: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Gather dim 1 of a ``(B|1, L, ...)`` tensor."""
    t = t.expand(kept.shape[0], *t.shape[1:])
    index = kept.view(*kept.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, index)


def _gather_positions(ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    if ids.dim() == 2:
        return ids.expand(kept.shape[0], -1).gather(1, kept)
    # multi-row rotary positions (M-RoPE): (rows, B, L)
    ids = ids.expand(ids.shape[0], kept.shape[0], -1)
    return ids.gather(2, kept.expand(ids.shape[0], -1, -1))


def _gather_mask(mask: torch.Tensor, rows: torch.Tensor | None, columns: torch.Tensor) -> torch.Tensor:
    batch = columns.shape[0]
    mask = mask.expand(batch, *mask.shape[1:])
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    return mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))


def _mark_cache(cache, index: int, dropped: int) -> None:
    if cache is None or not hasattr(cache, "layers"):
        return
    layers = cache.layers
    while index >= len(layers) and cache.layer_class_to_replicate is DynamicLayer:
        layers.append(DynamicLayer())
    layer = layers[index]
    if type(layer) is DynamicLayer and not layer.is_initialized:
        layers[index] = PrunedCacheLayer(dropped)
    elif isinstance(layer, PrunedCacheLayer):
        layer.dropped = dropped
    elif not isinstance(layer, DynamicLayer) or layer.is_initialized:
        raise NotImplementedError(f"vlmtools: token dropping needs a fresh DynamicCache, got {type(layer).__name__}")
