"""Dropping tokens for real from a decoder layer on (the runtime under pruning).

From the first drop layer on, every layer sees only the kept tokens: hidden states
are sliced at each drop layer, and each layer's own inputs, which the model computed
for the full prompt, are gathered to the kept positions: rotary ``position_embeddings``
(so each token keeps its original position, all M-RoPE rows included), ``position_ids``
and the attention mask in the form the model's attention implementation reads it (so
left padding stays masked): the 4-D mask's rows and columns (eager, SDPA), the 2-D
padding mask's columns (FlashAttention), a ``BlockMask`` rebuilt over the kept positions
(flex). Sequences packed in one row for FlashAttention (``cu_seq_lens_*``, or position ids
that restart) get the cumulative lengths of their kept tokens. Keys and values of dropped
tokens never enter that layer's KV cache. During cached decoding the mask's key columns
are gathered to the kept prompt positions plus every generated one; a cache layer that evicts
keys (``streaming.SinkCache``'s) says instead which keys it holds are visible (``visible_keys``),
and the decoding mask is those, then the new tokens' own columns.

The cache layers of pruned layers report their *virtual* length (kept + dropped):
transformers derives new tokens' positions and mask sizes from the cache length, and
those must stay those of the unpruned sequence.

``positions="compact"`` renumbers instead: from a drop layer on, each kept token's
position id moves back by the real (non-padding) tokens dropped before it, so the kept
tokens sit at consecutive positions as if the prompt had been that short (what a method
that shortens the LM's input sequence hands the model, e.g. VisionZip's released code);
the rotary tables are recomputed by the language model's ``rotary_emb`` for the new ids,
and during decoding every new token's id moves back by all real tokens dropped up to that
layer. Models with several rows of position ids (Qwen-VL's M-RoPE) keep ``"original"``.

Hybrid families (Qwen3.5) pass the kept tokens through their linear-attention layers too: those
layers' padding mask is gathered like any 2-D mask, their conv and recurrent states are built from the
kept tokens alone, and their cache layers report the virtual length as the attention layers' do.
What a family's LM adds between its layers outside them (Qwen3-VL's DeepStack features, an adapter's
``residual_adds``) is gathered to the tokens present (:func:`residual_add_gathered`).
"""
from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from .plan import ACTIVE_PLAN, ForwardState, LayerHook, Plan

POSITIONS = ("original", "compact")

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


class PrunedLinearCacheLayer(LinearAttentionLayer):
    """A linear-attention cache layer (conv and recurrent state) built from fewer tokens than the sequence it
    stands for: it reports the virtual length, as :class:`PrunedCacheLayer` does."""

    def __init__(self, dropped: int, number_of_states: int = 1):
        super().__init__(number_of_states=number_of_states)
        self.dropped = dropped

    def get_seq_length(self):
        return super().get_seq_length() + self.dropped


class DropTokens:
    """Intervention: at each ``layer`` of ``stages`` keep only what its chooser picks.

    ``positions``: ``"original"`` (each kept token keeps its position id) or ``"compact"`` (kept tokens
    renumbered to consecutive ids, see the module's docstring).

    What one block kept is its :class:`DropRun`, ``trace[drop]``:

    >>> drop = DropTokens({2: keep_first_half})
    >>> with vlm.use(drop) as trace:
    ...     model.generate(**inputs)
    >>> trace[drop].kept_at(2)          # (B, n) original positions present in layer 2
    """

    def __init__(self, stages: dict[int, Chooser], positions: str = "original"):
        if not stages or min(stages) < 0:
            raise ValueError("stages must map decoder-layer indices >= 0 to choosers")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        self.stages = dict(sorted(stages.items()))
        self.positions = positions

    def attach(self, vlm, plan: Plan) -> DropRun:
        first = min(self.stages)
        if first >= vlm.num_layers:
            raise ValueError(f"drop layer {first} >= the model's {vlm.num_layers} decoder layers")
        rotary = _rotary_module(vlm) if self.positions == "compact" else None
        kinds = None  # a rotary embedding whose tables depend on the layer's type (Gemma 3) gets each layer's
        if rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
            kinds = vlm.model.config.get_text_config().layer_types
        run = plan.trace[self] = DropRun(self.stages, plan.state, last=vlm.num_layers - 1,
                                         positions=self.positions, rotary=rotary, layer_types=kinds)
        for index in range(first, vlm.num_layers):
            plan.layer(index, vlm.layers[index], run)
        return run


class DropRun(LayerHook):
    """One block of :class:`DropTokens`: the hook on its layers and what each drop layer kept."""

    def __init__(self, stages: dict[int, Chooser], state: ForwardState, last: int | None = None,
                 positions: str = "original", rotary: torch.nn.Module | None = None,
                 layer_types: list[str] | None = None):
        self.stages, self.state, self.last = stages, state, last
        self.positions, self.rotary = positions, rotary
        self.layer_types = layer_types
        """Each decoder layer's type where the rotary tables depend on it (Gemma 3: sliding and full layers)."""
        self.kept: dict[int, torch.Tensor] = {}
        """Drop layer -> original positions it kept at the latest prefill, ``(B, n)``."""
        self.shift: dict[int, torch.Tensor] = {}
        """``positions="compact"``: drop layer -> real tokens dropped up to it, per sample ``(B, 1)``."""
        self.prompt_len = self.length = 0
        self._renumbered: tuple = ()  # (ids, drop layer, compacted inputs): the layers of one stage share them
        self._gathered: tuple = ()  # (mask, kept, its gathered mask): the layers of one stage share it in a call

    def kept_at(self, index: int) -> torch.Tensor:
        """Original positions present in layer ``index`` during the last prefill, ``(B, n)``."""
        return self.kept[max(layer for layer in self.kept if layer <= index)]

    def before_layer(self, index, hidden, kwargs):
        if self.state.step == 0 and index == min(self.stages):
            self.kept, self.shift = {}, {}
            self.prompt_len = self.length = hidden.shape[1]
        elif index == min(self.stages):
            self.length += hidden.shape[1]  # the keys of the unpruned sequence through this decoding step
        kept = None
        if self.state.step == 0:
            hidden = self._prefill_drop(index, hidden)
            kept = self.state.present = self.state.kept_keys[index] = self.kept_at(index)
            inputs = _gather_inputs(kwargs, kept)
            if self.positions == "compact":
                inputs.update(self._compacted(index, kwargs, kept))
            kwargs = {**kwargs, **inputs}
            _mark_cache(kwargs.get("cache", kwargs.get("past_key_values")), index, self.prompt_len - kept.shape[1])
        elif self.positions == "compact":
            kwargs = {**kwargs, **self._compacted(index, kwargs, None)}
        mask = kwargs.get("attention_mask")
        held = _held_visible(kwargs, index) if kept is None else None
        if held is not None:
            kwargs = {**kwargs, "attention_mask": _held_mask(mask, held, hidden.shape[1])}
        elif mask is not None:
            kwargs = {**kwargs, "attention_mask": self._gathered_mask(mask, kept, self.kept_at(index))}
        if index == self.last:
            self._gathered = self._renumbered = ()  # not held past the call (the run lives on in the trace)
        return hidden, kwargs

    def _compacted(self, index: int, kwargs: dict[str, Any], kept: torch.Tensor | None) -> dict[str, Any]:
        """``positions="compact"``: the kept tokens' position ids renumbered without the gaps of dropped real
        tokens, and their rotary tables; at a decoding step (``kept`` None) the new tokens' ids move back by
        every real token dropped up to this layer. The layers of one stage share them within a call."""
        stage = max(layer for layer in self.kept if layer <= index)
        ids = kwargs.get("position_ids")
        kind = self._kind(index)
        if self._renumbered and self._renumbered[0] is ids and self._renumbered[1] == (stage, kind):
            return self._renumbered[2]
        if kept is not None:
            out, self.shift[stage] = self._renumber(kwargs, kept, kind)
        else:
            _one_row(ids)
            shifted = ids.expand(self.shift[stage].shape[0], -1) - self.shift[stage]
            out = {"position_ids": shifted, **self._tables(kwargs, shifted, kind)}
        self._renumbered = (ids, (stage, kind), out)
        return out

    def _kind(self, index: int) -> str | None:
        """The layer type the rotary embedding takes for layer ``index`` (None: one table for every layer)."""
        return self.layer_types[index] if self.layer_types else None

    def _rotary(self, x: torch.Tensor, ids: torch.Tensor, kind: str | None):
        return self.rotary(x, ids) if kind is None else self.rotary(x, ids, kind)

    def _renumber(self, kwargs: dict[str, Any], present: torch.Tensor, kind: str | None = None):
        """Position ids of ``present`` minus the real (non-padding) tokens absent before each, their rotary tables,
        and the count of absent real tokens per sample ``(B, 1)``."""
        ids = kwargs.get("position_ids")
        _one_row(ids)
        tables = kwargs.get("position_embeddings")
        if tables is not None and not all(torch.equal(a, b) for a, b in zip(self._rotary(tables[0], ids, kind), tables)):
            raise NotImplementedError("positions='compact' renumbers one row of position ids per sample; this model's "
                                      "rotary tables are not those of the position ids its layers get (M-RoPE rows "
                                      "of an image prompt): use positions='original'")
        batch = present.shape[0]
        real = torch.ones(batch, self.prompt_len, dtype=torch.bool, device=present.device)
        if self.state.layout is not None:
            for b, sample in enumerate(self.state.layout.samples):
                real[b, sample.padding.to(present.device)] = False
        absent = real.scatter(1, present, False)
        ids = _gather_positions(ids, present) - absent.cumsum(1).gather(1, present)
        return {"position_ids": ids, **self._tables(kwargs, ids, kind)}, absent.sum(1, keepdim=True)

    def _tables(self, kwargs: dict[str, Any], ids: torch.Tensor, kind: str | None = None) -> dict[str, Any]:
        tables = kwargs.get("position_embeddings")
        return {} if tables is None else {"position_embeddings": self._rotary(tables[0], ids, kind)}

    def _gathered_mask(self, mask, rows: torch.Tensor | None, kept: torch.Tensor):
        """The mask of the kept queries (``rows``; at a decoding step, None: the new token) and keys (the kept
        prompt positions and, at a decoding step, every generated one); computed once per stage and call."""
        if self._gathered and self._gathered[0] is mask and self._gathered[1] is kept:
            return self._gathered[2]
        columns, offset = kept, 0
        if rows is None:
            generated = torch.arange(self.prompt_len, self.length, device=kept.device)
            columns = torch.cat([kept, generated.expand(kept.shape[0], -1)], 1)
            # a sliding-window layer's decoding mask covers only the last keys of the sequence (the window)
            offset = self.length - _key_length(mask)
        gathered = _gather_mask(mask, rows, columns, offset)
        self._gathered = (mask, kept, gathered)
        return gathered

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


def _one_row(ids) -> None:
    if ids is None or ids.dim() != 2:
        raise NotImplementedError("positions='compact' renumbers one row of position ids per sample; this model "
                                  + ("passes none to its layers" if ids is None else f"passes {ids.shape[0]} rows (M-RoPE)")
                                  + ": use positions='original'")


def _rotary_module(vlm) -> torch.nn.Module:
    """The language model's rotary embedding (``rotary_emb`` beside its decoder layers), which compacted
    positions need to recompute the tables."""
    path = vlm.adapter.text_layers.rpartition(".")[0]
    rotary = getattr(vlm.model.get_submodule(path), "rotary_emb", None) if path else None
    if rotary is None:
        raise NotImplementedError(f"positions='compact' needs the rotary embedding beside {vlm.family}'s decoder "
                                  "layers (rotary_emb); use positions='original'")
    return rotary


def _gather_inputs(kwargs: dict[str, Any], kept: torch.Tensor) -> dict[str, Any]:
    """A layer's prefill inputs other than its mask, gathered to the kept positions."""
    out = {}
    cos_sin = kwargs.get("position_embeddings")
    if cos_sin is not None:
        out["position_embeddings"] = tuple(_gather_seq(t, kept) for t in cos_sin)
    ids = kwargs.get("position_ids")
    if ids is not None:
        out["position_ids"] = _gather_positions(ids, kept)
    out.update(packed_lengths(kwargs, kept))
    return out


def packed_lengths(kwargs: dict[str, Any], kept: torch.Tensor) -> dict[str, Any]:
    """FlashAttention's varlen inputs of sequences packed in one row, for the kept positions (``(1, n)``).

    The cumulative lengths are those given (``cu_seq_lens_q`` / ``_k``) or, with no padding mask, those
    that restarting position ids tell (what FlashAttention infers from them, which it could no longer do
    from the kept ones when a sequence's first token is dropped); each becomes the count of kept positions
    before it. Nothing for a batch that is not packed.
    """
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        ids = kwargs.get("position_ids")
        if kwargs.get("attention_mask") is not None or ids is None or ids.dim() != 2 \
                or not _is_packed_sequence(ids, kept.shape[0]):
            return {}
        (cu_q, cu_k), _ = prepare_fa_kwargs_from_position_ids(ids)
    out = {}
    for side, cu in (("q", cu_q), ("k", cu_k)):
        lengths = torch.searchsorted(kept[0].contiguous(), cu.to(device=kept.device, dtype=kept.dtype)).to(cu.dtype)
        out[f"cu_seq_lens_{side}"] = lengths
        out[f"max_length_{side}"] = int(lengths.diff().max())
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


def _held_visible(kwargs: dict[str, Any], index: int) -> torch.Tensor | None:
    """``(B, held)``: which keys a cache layer that evicts (``streaming.SinkCache``'s) holds a new token may see,
    or None for a cache that holds every kept prompt key and every generated one."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", ())
    return getattr(layers[index], "visible_keys", None) if index < len(layers) else None


def _held_mask(mask, held: torch.Tensor, new: int):
    """A decoding step's mask over an evicting cache layer's keys: the held keys ``held`` says are visible, then
    the ``new`` tokens' own columns of the mask the model built (whose earlier columns are another layer's)."""
    if isinstance(mask, BlockMask):
        return _held_block_mask(mask, held, new)
    if mask is None:
        if bool(held.all()):
            return None
        causal = torch.ones(new, new, dtype=torch.bool, device=held.device).tril()
        mask = causal.expand(held.shape[0], 1, new, new)
    if mask.dim() == 2:
        return torch.cat([held.to(mask.dtype), mask[:, -new:]], 1)
    columns = held.to(mask.device)[:, None, None, :].expand(-1, 1, mask.shape[2], -1)
    if mask.dtype != torch.bool:
        columns = torch.zeros_like(columns, dtype=mask.dtype).masked_fill(~columns, torch.finfo(mask.dtype).min)
    return torch.cat([columns, mask[..., -new:].expand(held.shape[0], -1, -1, -1)], -1)


def _held_block_mask(mask: BlockMask, held: torch.Tensor, new: int) -> BlockMask:
    """:func:`_held_mask` for flex: a BlockMask whose ``mask_mod`` reads ``held`` on the held columns and the
    original's ``mask_mod`` on the ``new`` tokens' own (its last) columns."""
    mask_mod, count, k_len = mask.mask_mod, held.shape[1], mask.seq_lengths[1]
    held = held.bool()

    def held_mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        own = mask_mod(batch_idx, head_idx, q_idx, (kv_idx - count + k_len - new).clamp(min=0))
        return torch.where(kv_idx < count, held[batch_idx, kv_idx.clamp(max=count - 1)], own)

    return ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"](
        batch_size=held.shape[0], q_length=mask.seq_lengths[0], kv_length=count + new, mask_function=held_mask_mod,
        device=held.device)


def _key_length(mask) -> int:
    return mask.seq_lengths[1] if isinstance(mask, BlockMask) else mask.shape[-1]


def _gather_mask(mask, rows: torch.Tensor | None, columns: torch.Tensor, offset: int = 0):
    """``mask`` restricted to the query positions ``rows`` (None: all, as they are) and the key positions
    ``columns`` (``(B, n)`` each), in the same form: a 4-D mask (eager, SDPA), a 2-D padding mask
    (FlashAttention, whose queries follow from it) or a flex ``BlockMask``. ``offset``: the position of the
    mask's first key column (a sliding-window layer's decoding mask starts inside the sequence); keys before it
    are not visible."""
    batch = columns.shape[0]
    outside = columns < offset if offset else None
    columns = (columns - offset).clamp(min=0) if offset else columns
    if isinstance(mask, BlockMask):
        return _gather_block_mask(mask, rows, columns, outside)
    if mask.dim() == 2:
        gathered = mask.expand(batch, -1).gather(1, columns)
        return gathered if outside is None else gathered.masked_fill(outside, False)
    mask = mask.expand(batch, *mask.shape[1:])
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[3]))
    gathered = mask.gather(3, columns[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1))
    if outside is None:
        return gathered
    hidden = False if gathered.dtype == torch.bool else torch.finfo(gathered.dtype).min
    return gathered.masked_fill(outside[:, None, None, :], hidden)


def _gather_block_mask(mask: BlockMask, rows: torch.Tensor | None, columns: torch.Tensor,
                       outside: torch.Tensor | None = None) -> BlockMask:
    """A BlockMask over the kept positions, built by transformers' flex mask builder from the original's
    ``mask_mod`` read at the original positions (causality, padding and offsets stay those of the full prompt);
    ``outside`` flags keys before the mask's first column (never visible)."""
    mask_mod = mask.mask_mod

    def kept_mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        visible = mask_mod(batch_idx, head_idx, q_idx if rows is None else rows[batch_idx, q_idx],
                           columns[batch_idx, kv_idx])
        return visible if outside is None else visible & ~outside[batch_idx, kv_idx]

    return ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"](
        batch_size=columns.shape[0], q_length=mask.seq_lengths[0] if rows is None else rows.shape[1],
        kv_length=columns.shape[1], mask_function=kept_mask_mod, device=columns.device)


def _mark_cache(cache, index: int, dropped: int) -> None:
    if cache is None or not hasattr(cache, "layers"):
        return
    layers = cache.layers
    while index >= len(layers) and cache.layer_class_to_replicate is DynamicLayer:
        layers.append(DynamicLayer())
    layer = layers[index]
    if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and not layer.is_initialized:
        # a pruned sliding-window layer keeps every kept key: its decoding mask (gathered to the kept positions)
        # applies the window, whose keys the kept ones no longer are the last of
        layers[index] = PrunedCacheLayer(dropped)
    elif type(layer) is LinearAttentionLayer and not any(layer.has_previous_state.values()):
        layers[index] = PrunedLinearCacheLayer(dropped, layer.number_of_states)
    elif isinstance(layer, (PrunedCacheLayer, PrunedLinearCacheLayer)):
        layer.dropped = dropped
    elif not isinstance(layer, DynamicLayer) or layer.is_initialized:
        raise NotImplementedError(f"vlmtools: token dropping needs a fresh DynamicCache, got {type(layer).__name__}")


_PATCHED: dict[tuple[int, str], list] = {}  # (module id, method) -> [count, original]
_PATCH_LOCK = threading.Lock()


@contextmanager
def residual_add_gathered(model: torch.nn.Module, add) -> Iterator[None]:
    """For the block: ``add`` (an adapter's :class:`~vlmtools.adapters.base.ResidualAdd`) of ``model`` adds its
    values at the tokens still present when a token drop has shortened the residual stream (the mask and the
    values gathered to ``state.present``, the original positions of those tokens); with nothing dropped it is
    the model's own method, bit for bit. Reference-counted per module, also across threads."""
    module = model.get_submodule(add.module)
    key = (id(module), add.method)
    with _PATCH_LOCK:
        entry = _PATCHED.get(key)
        if entry is None:
            setattr(module, add.method, _gathering(getattr(module, add.method)))
            entry = _PATCHED[key] = [0]
        entry[0] += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _PATCHED[key]
                delattr(module, add.method)  # the class's method shows through again


def _gathering(original):
    def add(hidden, mask, values, *args, **kwargs):
        plan = ACTIVE_PLAN.get()
        present = plan.state.present if plan is not None else None
        if mask is None or present is None or hidden.shape[1] == mask.shape[1]:
            return original(hidden, mask, values, *args, **kwargs)
        if present.shape != hidden.shape[:2]:
            raise RuntimeError(f"vlmtools: {tuple(hidden.shape[:2])} tokens reach an addition between layers, but the "
                               f"token drop kept {tuple(present.shape)}")
        mask = mask.to(present.device)
        kept = torch.zeros_like(mask).scatter_(1, present, True)
        return original(hidden, mask.gather(1, present), values[kept[mask].to(values.device)], *args, **kwargs)
    return add
