"""What the current forward pass should record and edit: hooks, the plan and its trace.

A :class:`Plan` maps attention sites (and decoder layers) to hooks. It is made active
for a block of code by the seam (:func:`vlmtools.attention.activate`), which stores it
in a :class:`contextvars.ContextVar`: two threads or two asyncio tasks each see their
own plan, and nothing is kept in class attributes. Sites nobody planned run the
fused kernel unchanged.

Hooks are small objects with one job each. An :class:`AttentionHook` is asked, at every
call of its site, which query rows of post-softmax attention it needs (:meth:`rows`);
the seam computes only those rows (chunked when all are asked for), lets the hook bias
their logits, edit their probabilities and record them, and writes back only rows that
were edited. A hook whose edit is a fixed additive bias on the logits (:meth:`logit_bias`)
needs no rows: the seam adds it inside the fused kernel where the kernel takes one. A
:class:`LayerHook` sees (and may replace) the residual stream entering a decoder layer
together with that layer's keyword arguments (masks, positions).
"""
from __future__ import annotations

from collections import defaultdict
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

ALL: Literal["all"] = "all"
"""Sentinel returned by :meth:`AttentionHook.rows` to ask for every query row."""

Rows = torch.Tensor | Literal["all"]


@dataclass(frozen=True)
class AttentionSite:
    """One attention module of a wrapped model, with a consistent name.

    Names follow one scheme for every family: ``text.{i}``, ``vision.{i}``,
    ``dit.double.{i}`` / ``dit.single.{i}`` (FLUX), ``dit.joint.{i}`` (SD3).
    """

    name: str
    stream: Literal["text", "vision", "dit"]
    index: int
    module: torch.nn.Module = field(compare=False, repr=False)
    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class AttentionCall:
    """Everything a hook may read about one call of a planned site.

    ``key`` and ``value`` are already repeated to the query heads (GQA).
    ``visible`` is a boolean mask broadcastable to ``(B, H, Lq, Lk)`` (True = may
    attend) or None when every key is visible to every query.
    """

    site: AttentionSite
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    visible: torch.Tensor | None
    scaling: float
    kv_heads: int

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def k_len(self) -> int:
        return self.key.shape[2]

    @property
    def is_prefill(self) -> bool:
        """True for a pass over the whole prompt, False for one cached decoding step."""
        return self.q_len == self.k_len

    def visible_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The visibility mask restricted to ``rows`` (or None when all is visible)."""
        if self.visible is None:
            return None
        if self.visible.shape[-2] == 1:
            return self.visible
        return self.visible[..., rows, :]


class AttentionHook:
    """Base class of everything that reads or edits attention at one site.

    Override only what the hook needs; the seam skips the explicit path for hooks
    that ask for no rows, and writes back outputs only for hooks that edit.
    """

    def observe(self, call: AttentionCall) -> None:
        """Called once per call of the site, before anything else (cheap reads of q/k/v)."""

    def rows(self, call: AttentionCall) -> Rows | None:
        """Query rows of post-softmax attention this hook needs: indices, ALL, or None."""
        return None

    def logit_bias(self, call: AttentionCall) -> torch.Tensor | None:
        """An additive pre-softmax bias broadcastable to ``(B, H, Lq, Lk)``, or None: this call unedited.

        Unlike :meth:`edit_logits` it does not depend on the logits, so the seam adds it inside the fused kernel
        where that kernel takes an additive bias (SDPA, flex, eager: transformers' ``position_bias`` or the mask)
        and else on the explicit path's logits of every row. A bias never makes a hidden key visible.
        """
        return None

    def edit_logits(self, call: AttentionCall, rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Return edited pre-softmax logits ``(B, H, len(rows), Lk)`` (fp32)."""
        return logits

    def edit_probs(self, call: AttentionCall, rows: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Return edited post-softmax probabilities ``(B, H, len(rows), Lk)`` (fp32)."""
        return probs

    def record(self, call: AttentionCall, rows: torch.Tensor, probs: torch.Tensor) -> None:
        """Read the probabilities that the model uses for ``rows`` (after edits)."""

    @property
    def edits_logits(self) -> bool:
        return type(self).edit_logits is not AttentionHook.edit_logits

    @property
    def edits_probs(self) -> bool:
        return type(self).edit_probs is not AttentionHook.edit_probs

    @property
    def edits(self) -> bool:
        return self.edits_logits or self.edits_probs


class LayerHook:
    """Reads or replaces the residual stream entering a decoder layer.

    ``kwargs`` are the layer's keyword arguments (``attention_mask``,
    ``position_embeddings``, ``position_ids``, ...). Return None to leave both as
    they are, or a new ``(hidden, kwargs)`` pair.
    """

    def before_layer(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]):
        return None


class Chunks(list):
    """The row chunks of one call's record (the seam may hand rows over in several chunks)."""

    def joined(self) -> torch.Tensor:
        """The chunks joined along the query dim. The join replaces the chunks inside this list
        (one copy held), and chunks that land after a read are appended after it."""
        if not self:
            raise LookupError("vlmtools: no rows of this call are recorded yet")
        if len(self) > 1:
            self[:] = [torch.cat(self, 2)]
        return self[0]


class Trace(dict):
    """What one ``use`` block recorded and computed.

    * A string key holds a recorder's entries, one per call: ``trace["text.3.rows"]``.
      Recorders write with ``setdefault``; reading an entry joins its row chunks into a
      new list, so a read (also from a hook in the middle of a forward) changes nothing
      that is read after it.
    * An intervention as key gives what that intervention computed in this block (the
      run its ``attach`` made): ``trace[host].kept_at(2)``, ``trace[var].sinks``. The
      intervention object itself holds only settings, so one object may serve several
      blocks, also at once on two threads, each with its own trace.
    """

    def __init__(self):
        super().__init__()
        self._runs: dict[int, tuple[Any, Any]] = {}

    def __getitem__(self, key):
        if not isinstance(key, str):
            try:
                return self._runs[id(key)][1]
            except KeyError:
                raise KeyError(f"vlmtools: {type(key).__name__} was not used in this block") from None
        return [entry.joined() if isinstance(entry, Chunks) else entry for entry in super().__getitem__(key)]

    def __contains__(self, key) -> bool:
        return super().__contains__(key) if isinstance(key, str) else id(key) in self._runs

    def __setitem__(self, key, value):
        if isinstance(key, str):
            return super().__setitem__(key, value)
        if id(key) in self._runs:
            raise ValueError(f"vlmtools: one {type(key).__name__} used twice in one block; make a second one")
        self._runs[id(key)] = (key, value)  # the intervention is held so that its id stays its own


class StopForward(Exception):
    """Raised by a hook to end a probe-only forward early; swallowed by ``use``."""


@dataclass
class ForwardState:
    """What the seam knows about the forwards of one ``use`` block so far.

    ``layout`` is the :class:`~vlmtools.layout.TokenLayout` of the latest prompt
    (set when the model is called on a prompt); ``input_ids`` its token ids (methods
    that select tokens by word, e.g. GIFT, decode them); ``step`` counts calls since
    then (0 = prefill, 1.. = cached decoding steps). ``letterbox`` holds the letterbox
    padding of images the vision tower encoded before their prompt's prefill (``generate``
    does so); ``pixels_pending`` says the prompt's pixels reach the tower inside its forward.
    ``present`` holds the original positions ``(B, n)`` of the tokens in the residual stream of the latest
    decoder layer a token drop ran in at prefill (what the LM's additions between layers are gathered to).
    ``kept_keys`` maps each decoder layer a token drop shortened at the latest prefill to the original prompt
    positions ``(B, n)`` its tokens stand at (empty when nothing was dropped); :func:`key_positions` reads it,
    and ``cache``, the KV cache of the latest forward (None without one).
    """

    layout: Any = None
    input_ids: Any = None
    step: int = 0
    letterbox: Any = None
    pixels_pending: bool = False
    present: Any = None
    kept_keys: dict = field(default_factory=dict)
    cache: Any = None


def key_positions(state: ForwardState, layer: int, k_len: int) -> torch.Tensor | None:
    """The original positions ``(B, k_len)`` of the keys layer ``layer``'s attention sees: the prompt positions
    a token drop kept there at the latest prefill, then ``seq_len, seq_len + 1, ...`` for the generated tokens
    (cached decoding steps); where that layer's cache has dropped keys, those it holds: a cache layer that says
    which of its tokens it returned (``held_received``, ``streaming.SinkCache``'s once it has evicted), or a
    sliding window's latest ``k_len`` (Gemma 3's sliding layers); None when none of these (keys are then
    positions ``0 .. k_len - 1``)."""
    received = _held_received(state, layer, k_len)
    kept = state.kept_keys.get(layer)
    if kept is None:
        return received if received is not None else _window_positions(state, layer, k_len)
    length = k_len if received is None else int(received.max()) + 1  # the tokens the layer was given
    start = state.layout.seq_len if state.layout is not None else int(kept.max()) + 1
    generated = torch.arange(start, start + length - kept.shape[1], device=kept.device)
    positions = torch.cat([kept, generated.expand(kept.shape[0], -1)], 1)
    return positions if received is None else positions.gather(1, received.to(kept.device))


def _held_received(state: ForwardState, layer: int, k_len: int) -> torch.Tensor | None:
    """Which of the tokens it was given (0, 1, ...) each of the ``k_len`` keys is, from a cache layer that has
    evicted some; None for every other cache layer."""
    cache = _cache_layer(state, layer)
    received = getattr(cache, "held_received", None) if getattr(cache, "evicted", False) else None
    return received if received is not None and received.shape[1] == k_len else None


def _window_positions(state: ForwardState, layer: int, k_len: int) -> torch.Tensor | None:
    """A sliding-window cache layer's keys: the latest ``k_len`` of the ``cumulative_length`` tokens it has seen
    (the current call's included: the layer updates its cache before attending)."""
    seen = getattr(_cache_layer(state, layer), "cumulative_length", None)
    if not isinstance(seen, int) or seen <= k_len or state.layout is None:  # a static cache's is a tensor
        return None
    return torch.arange(seen - k_len, seen).expand(len(state.layout.samples), -1)


def _cache_layer(state: ForwardState, layer: int):
    """Layer ``layer`` of the latest forward's KV cache, or None (no cache, or one without that layer)."""
    layers = getattr(state.cache, "layers", ())
    return layers[layer] if layer < len(layers) else None


class Plan:
    """Hooks per attention site and per decoder layer, plus the trace they fill.

    A plan made inside another active plan extends it (``parent``): nested ``use``
    blocks compose, share the trace and forward state, and the inner block's exit
    removes only its own hooks.
    """

    def __init__(self, parent: Plan | None = None):
        self.parent = parent
        self.trace = Trace() if parent is None else parent.trace
        self.state = ForwardState() if parent is None else parent.state
        self._attention: dict[torch.nn.Module, list[AttentionHook]] = defaultdict(list)
        self._layers: dict[torch.nn.Module, list[tuple[int, LayerHook]]] = defaultdict(list)
        self._names: dict[torch.nn.Module, str] = {}
        self.fired: set[str] = set()

    def attention(self, site: AttentionSite, hook: AttentionHook) -> AttentionHook:
        self._attention[site.module].append(hook)
        self._names[site.module] = site.name
        return hook

    def layer(self, index: int, module: torch.nn.Module, hook: LayerHook) -> LayerHook:
        self._layers[module].append((index, hook))
        return hook

    def attention_hooks(self, module: torch.nn.Module) -> list[AttentionHook]:
        own = self._attention.get(module, [])
        return (self.parent.attention_hooks(module) if self.parent else []) + own

    def layer_hooks(self, module: torch.nn.Module) -> list[tuple[int, LayerHook]]:
        own = self._layers.get(module, [])
        return (self.parent.layer_hooks(module) if self.parent else []) + own

    def mark_fired(self, module: torch.nn.Module) -> None:
        if module in self._names:
            self.fired.add(self._names[module])
        if self.parent:
            self.parent.mark_fired(module)

    def unfired(self) -> list[str]:
        """Planned sites that never ran in this block (a silent no-op is an error)."""
        return sorted(set(self._names.values()) - self.fired)


ACTIVE_PLAN: ContextVar[Plan | None] = ContextVar("vlmtools_active_plan", default=None)
