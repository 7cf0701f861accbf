"""StreamingLLM's cache (Xiao et al., ICLR 2024): the attention sinks plus a window of the most recent tokens,
as a transformers ``Cache`` that ``generate`` takes unchanged.

Positions inside the cache. The paper (and its released ``pos_shift`` attention) caches keys before the rotary
embedding and rotates them at their place in the cache on every step: sinks at ``0 .. k-1``, the window after
them, the new token last. Here keys are cached as the attention module hands them, rotated at their stream
positions, and only the keys in front of an evicted run are turned on by the positions eviction closed. Rotary
attention depends only on position differences and rotations compose (``R(a) R(b) = R(a + b)``), so each query
sees every key at the paper's distance: the window is one contiguous run in both, and each sink is moved up to sit
right before it. Why this form: transformers rotates before ``Cache.update`` (the pre-rotation key never reaches a
cache), ``generate`` keeps counting positions from the stream (``position_ids`` grow by one a step), and only the
few sink keys are rotated a step instead of the whole cache; each is rotated once, from its stored key, in fp32.

A layer holds ``capacity = k + window`` keys after every forward (and the lasting sinks, if kept); a forward's own
tokens see what the cache held plus each other, as in the released chat script, and the oldest tokens that are
neither sinks nor padding leave after it. A left-padded batch stays left-padded: a sample keeps its padding
until its real tokens fill the capacity, so every sample holds its first real tokens and the same number of
latest ones, and the 2-D mask ``generate`` keeps growing is read from column ``seen - held`` on
(``get_mask_sizes``). Once every sample holds only real tokens, one-token steps run in place (:class:`_Ring`):
no copy of the window per step, where a ``DynamicCache`` copies its whole cache.
"""
from __future__ import annotations

from collections import deque

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from vlmtools.adapters.base import UnsupportedModel
from vlmtools.drop import PrunedCacheLayer


class SinkLayer(PrunedCacheLayer):
    """One attention layer's cache: the sink keys (the first ``sinks`` real tokens of the prompt and the
    ``lasting`` prompt positions of each sample) and the latest tokens, ``capacity`` keys at most.

    Held per key: ``visible`` (a real token, not padding), ``sink``, ``shift`` (the positions it moves up
    to its place in the cache) and ``received`` (which of the tokens this layer was given it is: 0, 1, ...;
    ``held_received`` reads it for the keys the latest update returned, what :func:`vlmtools.plan.key_positions`
    maps to original positions). As a :class:`~vlmtools.drop.PrunedCacheLayer` it also takes the count of prompt
    tokens a pruning host dropped before this layer (``dropped``), so positions and mask sizes stay those of the
    unpruned stream.
    """

    is_croppable = False

    def __init__(self, sinks: int, window: int, inv_freq: torch.Tensor, lasting: list[list[int]] | None = None):
        super().__init__(dropped=0)
        self.sinks, self.window, self.inv_freq = sinks, window, inv_freq
        self.lasting = lasting
        self.capacity = sinks + window + max(map(len, lasting or [[]]))
        self.seen, self.evicted, self.uniform = 0, False, True
        self.visible = self.sink = self.shift = self.received = self.held_received = None
        self.ring: _Ring | None = None

    @property
    def held(self) -> int:
        """Keys held between calls (at most ``capacity``)."""
        return self.capacity if self.ring is not None else (self.keys.shape[-2] if self.is_initialized else 0)

    def update(self, key_states, value_states, *args, kwargs=None, **_):
        batch, _, new, _ = key_states.shape
        if self.ring is not None and new == 1:
            self.seen += 1
            keys, values = self.ring.step(key_states, value_states, self.seen - 1)
            self.held_received = self.ring.received
            return keys, values
        self._unring()
        positions = _positions((kwargs or {}).get("position_ids"), batch, new, self.seen, key_states.device)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            visible, sink = self._prompt_flags(positions)
            self.visible, self.sink = visible, sink
            self.shift = torch.zeros_like(positions)
            self.received = torch.arange(new, device=positions.device).expand(batch, -1)
        else:
            self.visible = torch.cat([self.visible, torch.ones_like(positions, dtype=torch.bool)], 1)
            self.sink = torch.cat([self.sink, torch.zeros_like(positions, dtype=torch.bool)], 1)
            self.shift = torch.cat([self.shift, torch.zeros_like(positions)], 1)
            received = torch.arange(self.seen, self.seen + new, device=positions.device).expand(batch, -1)
            self.received = torch.cat([self.received, received], 1)
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        self.seen += new
        keys, values, self.held_received = self.placed(), self.values, self.received
        self._evict()
        if self.evicted and self.uniform and new == 1:
            self._ring()
        return keys, values

    def _ring(self) -> None:
        """Decode steps from here on write in place (:class:`_Ring`), once every sample holds its sinks in the
        first ``capacity - window`` slots and no padding: checked once per step until then."""
        sinks = self.capacity - self.window
        self.uniform = bool(self.sink[:, :sinks].all()) and not bool(self.sink[:, sinks:].any())
        if self.uniform and bool(self.visible.all()):
            self.ring = _Ring(self.keys, self.values, self.shift, self.received, sinks, self.inv_freq)
            self.keys, self.values = self.ring.keys, self.ring.values

    def _unring(self) -> None:
        """Back to ordered keys (a forward of several tokens, a batch change)."""
        if self.ring is not None:
            self.keys, self.values, self.shift, self.received = self.ring.ordered()
            self.ring = None

    def _prompt_flags(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which prompt keys are real (left padding: every key before the last position 0) and which are sinks."""
        index = torch.arange(positions.shape[1], device=positions.device)
        zero = positions == 0
        first = torch.where(zero, index, -1).amax(1, keepdim=True).clamp(min=0)
        visible = index >= first
        sink = visible & (positions < self.sinks)
        if self.lasting is not None:
            if len(self.lasting) != positions.shape[0]:
                raise ValueError(f"lasting sinks are given for {len(self.lasting)} samples, the batch has "
                                 f"{positions.shape[0]}: build the cache from the same batch's report")
            for b, tokens in enumerate(self.lasting):  # prompt columns of a left-padded batch: position + padding
                sink[b] |= visible[b] & torch.isin(positions[b] + first[b], torch.tensor(tokens, device=sink.device))
        return visible, sink

    def placed(self) -> torch.Tensor:
        """The held keys rotated to their place in the cache. Only keys in front of an evicted one move, and
        eviction takes the oldest non-sink keys first, so the real keys that move are sinks at the front: the
        first ``capacity - window`` slots (a padded sample, which has evicted no real key, moves only padding)."""
        if not self.evicted:
            return self.keys
        moved = self.capacity - self.window
        head = _rotate(self.keys[:, :, :moved], self.shift[:, :moved], self.inv_freq)
        return torch.cat([head, self.keys[:, :, moved:]], -2)

    def _evict(self) -> None:
        """Drop the oldest keys that are neither sinks nor kept padding down to ``capacity``; every key in front
        of a dropped one moves up by one position per dropped key."""
        excess = self.keys.shape[-2] - self.capacity
        if excess <= 0:
            return
        self.evicted = True
        free = ~self.sink
        evict = free & (free.cumsum(1) <= excess)
        after = evict.flip(1).cumsum(1).flip(1) - evict.long()
        kept = evict.to(torch.uint8).sort(dim=1, stable=True).indices[:, : self.capacity]  # kept keys, in order
        self.shift = (self.shift + after).gather(1, kept)
        self.visible, self.sink = self.visible.gather(1, kept), self.sink.gather(1, kept)
        self.received = self.received.gather(1, kept)
        index = kept[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, index), self.values.gather(2, index)

    @property
    def visible_keys(self) -> torch.Tensor | None:
        """``(B, held)``: the held keys a new token may see (real tokens); read by a token drop's decoding mask."""
        return self.visible

    def get_seq_length(self) -> int:
        return self.seen + self.dropped

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.held + query_length, self.get_seq_length() - self.held

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.ring = None
        super().reset()
        self.seen, self.evicted, self.uniform = 0, False, True
        self.visible = self.sink = self.shift = self.received = self.held_received = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a sink cache cannot be cropped: evicted tokens are gone")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unring()
        if self.is_initialized:
            super().batch_select_indices(indices)
            flags = (self.visible, self.sink, self.shift, self.received)
            self.visible, self.sink, self.shift, self.received = (t[indices.to(t.device)] for t in flags)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unring()
        if self.is_initialized:
            super().batch_repeat_interleave(repeats)
            self.visible, self.sink, self.shift, self.received = (
                t.repeat_interleave(repeats, 0) for t in (self.visible, self.sink, self.shift, self.received))


class _Ring:
    """A full layer's decode steps in place: one slot more than ``capacity``; each step the oldest window slot
    takes the new key (attention does not depend on the order of keys it may all see), and the sink slots at
    the front are rewritten from their stored keys turned one position more. No copy of the window per step.
    The eviction a step makes waits for the next step: the keys a step returns are read after it returns, and
    the next step rewrites them in place (as a ``StaticCache``'s are): keep a copy to hold them longer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, shift: torch.Tensor, received: torch.Tensor,
                 sinks: int, inv_freq):
        held = keys.shape[-2]
        self.keys = torch.cat([keys, keys[:, :, :1]], -2)
        self.values = torch.cat([values, values[:, :, :1]], -2)
        self.received = torch.cat([received, received[:, :1]], 1)
        self.head, self.head_shift, self.inv_freq = keys[:, :, :sinks].clone(), shift[:, :sinks].clone(), inv_freq
        self.keys[:, :, :sinks] = _rotate(self.head, self.head_shift, inv_freq)
        self.ages = deque(range(sinks, held))  # window slots, oldest first
        self.free, self.full = held, False

    def step(self, key: torch.Tensor, value: torch.Tensor, received: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.full:  # the previous step's eviction: its oldest window key leaves, the sinks move up one
            self.free = self.ages.popleft()
            self.head_shift += 1
            self.keys[:, :, : self.head.shape[2]] = _rotate(self.head, self.head_shift, self.inv_freq)
        self.keys[:, :, self.free] = key[:, :, 0]
        self.values[:, :, self.free] = value[:, :, 0]
        self.received[:, self.free] = received
        self.ages.append(self.free)
        self.full = True
        return self.keys, self.values

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The held keys (stored sinks unturned, then the window oldest first), values, shifts and receipt
        indices."""
        if self.full:
            self.ages.popleft()
            self.head_shift += 1
        sinks = self.head.shape[2]
        order = torch.tensor(list(self.ages), device=self.keys.device)
        keys = torch.cat([self.head, self.keys.index_select(2, order)], -2)
        values = torch.cat([self.values[:, :, :sinks], self.values.index_select(2, order)], -2)
        shift = torch.cat([self.head_shift, self.head_shift.new_zeros(self.head_shift.shape[0], len(order))], 1)
        received = torch.cat([self.received[:, :sinks], self.received.index_select(1, order)], 1)
        return keys, values, shift, received


class SinkCache(Cache):
    """StreamingLLM's cache: ``sinks`` first tokens plus the ``window`` latest ones in every attention layer.

    >>> cache = SinkCache.detect(vlm, inputs, window=256)          # k from the shared sink detector
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=1000)
    >>> cache.peak_kv_bytes                                         # bounded by (k + window) keys per layer

    ``vlm`` is the wrapped model (``vlmtools.wrap``); ``lasting``: per sample, prompt positions kept as sinks
    besides the first ``sinks`` tokens (the detector's lasting sinks, :meth:`from_report`). A sliding-window
    layer (Gemma 3's local layers) keeps transformers' own window, already bounded. Refused: rotary positions
    with several rows (M-RoPE) and layers without a key cache (linear attention), with the reason.
    """

    def __init__(self, vlm, window: int, sinks: int, lasting: list[list[int]] | None = None):
        if window < 1:
            raise ValueError(f"window must be >= 1 (the latest tokens kept), got {window}")
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        text = vlm.model.config.get_text_config()
        rotary = _rotary(vlm)
        kinds = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        layers = []
        for kind in kinds:
            if kind == "sliding_attention":
                layers.append(DynamicSlidingWindowLayer(sliding_window=text.sliding_window))
            elif kind == "full_attention":
                inv_freq = getattr(rotary, f"{kind}_inv_freq", None)
                layers.append(SinkLayer(sinks, window, rotary.inv_freq if inv_freq is None else inv_freq, lasting))
            else:
                raise UnsupportedModel(f"{vlm.family}: its {kind} layers hold a state, not a list of keys to evict "
                                       "from; a sink cache needs every layer's keys")
        super().__init__(layers=layers)
        self.sinks, self.window, self.lasting = sinks, window, lasting
        self.peak_kv_bytes = 0
        """The most bytes of keys and values the cache held after any layer's update."""
        self._bytes = [0] * len(layers)

    @classmethod
    def from_report(cls, vlm, report, window: int, criterion: str | None = None, sinks: int | None = None,
                    lasting: bool = False) -> SinkCache:
        """``sinks`` (unless given) is the longest run of sinks from the first real token that ``criterion``
        (default: the report's only one) found in any sample; ``lasting=True`` also keeps each sample's other
        tokens it found (its lasting sinks, e.g. secondary or visual sinks) for the whole stream."""
        from .sinks import lasting_sinks, leading_sinks

        sinks = leading_sinks(report, criterion) if sinks is None else sinks
        return cls(vlm, window, sinks, lasting_sinks(report, criterion) if lasting else None)

    @classmethod
    def detect(cls, vlm, inputs: dict, window: int, criterion: str = "positional", sinks: int | None = None,
               lasting: bool = False) -> SinkCache:
        """Run the shared detector with ``criterion`` on the prompt (one forward) and build the cache from it.
        The default, ``positional``, is the released code's four first tokens."""
        from vlmtools.sinks import SinkDetector

        return cls.from_report(vlm, SinkDetector([criterion]).detect(vlm, inputs), window, sinks=sinks, lasting=lasting)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        self._bytes[layer_idx] = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes)
        return out

    def reset(self) -> None:
        super().reset()
        self._bytes, self.peak_kv_bytes = [0] * len(self.layers), 0

    @property
    def kv_bytes(self) -> int:
        """Bytes of the keys and values the cache holds now, every layer."""
        return sum(self._bytes)

    @property
    def held(self) -> int:
        """Keys held now in the first attention layer (at most ``capacity``)."""
        return max(layer.held for layer in self.layers if isinstance(layer, SinkLayer))


def _rotary(vlm) -> torch.nn.Module:
    """The language model's rotary embedding; refuses M-RoPE, whose 3-row positions give no one place a key has."""
    path = vlm.adapter.text_layers.rpartition(".")[0]
    rotary = getattr(vlm.model.get_submodule(path), "rotary_emb", None) if path else None
    if rotary is None:
        raise UnsupportedModel(f"{vlm.family}: a sink cache moves keys by their rotary positions, and no rotary "
                               "embedding sits beside its decoder layers (rotary_emb)")
    if getattr(rotary, "mrope_section", None) is not None:
        raise UnsupportedModel(f"{vlm.family}: M-RoPE gives a token three position rows (an image's tokens share "
                               "one temporal position), so a key's place in the cache is no one position to move it to")
    return rotary


def _positions(ids: torch.Tensor | None, batch: int, new: int, seen: int, device) -> torch.Tensor:
    """The new keys' rotary positions ``(B, new)``: the position ids the layer got, else the stream's count."""
    if ids is None:
        return torch.arange(seen, seen + new, device=device).expand(batch, -1)
    if ids.dim() != 2:
        raise UnsupportedModel(f"a sink cache moves keys by one row of positions; this model passes {ids.shape[0]}")
    return ids.to(device).expand(batch, -1)


def _rotate(keys: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``keys`` ``(B, H, n, D)`` rotated by ``shift`` ``(B, n)`` more positions (transformers' rotate-half form),
    in fp32; only the first ``2 * len(inv_freq)`` dims rotate (partial rotary)."""
    dims = 2 * inv_freq.shape[0]
    angle = shift[:, None, :, None].float() * inv_freq.float().to(keys.device)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    rot = keys[..., :dims].float()
    half = torch.cat([-rot[..., dims // 2:], rot[..., : dims // 2]], -1)
    turned = (rot * cos + half * sin).to(keys.dtype)
    return torch.cat([turned, keys[..., dims:]], -1) if dims < keys.shape[-1] else turned
