"""VAR (Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal
Models", ICLR 2025): take attention off visual sink tokens and give it to the rest of
the image.

Why: a few visual tokens carry the same massive "sink dimensions" as the BOS sink and
soak up attention while holding little image content. In heads that are already
looking at the image (image-centric heads), moving part of that mass onto the other
visual tokens makes the model read more of the image; the row sum is unchanged, so
the rest of the computation sees an ordinary attention distribution.

Sink dimensions D are one set per model: the published table (LLaMA-2-7B / 13B,
Qwen2-VL-7B), else discovered once over the middle layers by the shared detector's rule
(the dimensions where the first token's ``|h_d| / rms(h)`` exceeds ``tau`` in at least
half of layers 2 .. L-1; :func:`vlmtools.sinks.dims.model_sink_dims`) and cached with the
model's calibration. The authors' released code ships the table only. Sink tokens are then
found with that D at prefill, on the input of each edited layer (as the released code does,
layer by layer), and frozen for the decoding steps. Finding none (no sink dimension, or no
visual token above ``tau``) is warned about (:class:`NoSinksWarning`) and recorded in
``trace[var].settings["status"]``: VAR then changes nothing.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch

from vlmtools.plan import AttentionHook, LayerHook, key_positions
from vlmtools.sinks.base import SinkTensors
from vlmtools.sinks.dims import PUBLISHED_SINK_DIMS, SinkDimensions, model_signature, model_sink_dims

from .common import key_mask, keys_of, visual_mask

TINY = 1e-12


class NoSinksWarning(UserWarning):
    """VAR has nothing to move: the model has no sink dimension, or a prompt no visual sink token."""


def redistribute(probs: torch.Tensor, visual: torch.Tensor, sinks: torch.Tensor, moved: float, rho: float,
                 min_image: float = 0.2, rows: torch.Tensor | None = None, text_sinks: torch.Tensor | None = None,
                 rule: Literal["paper", "released"] = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """VAR's edit of post-softmax rows; returns ``(edited, selected)``.

    ``probs`` ``(B, H, R, K)``; ``visual`` / ``sinks`` ``(B, K)`` bool (sinks among the
    visual tokens); ``rows`` ``(B, R)`` bool marks the rows that may change. A
    (sample, head, row) is image-centric (``selected``, ``(B, H, R)``) when its image
    mass is at least ``min_image`` and, by ``rule``, ``"paper"``: the share of it on
    non-sink visual tokens is at least ``rho``; ``"released"`` (the authors' code): the
    share on visual sinks is at most ``rho`` and the sample has a visual sink. There, sink
    columns are scaled by ``1 - moved`` and the freed mass goes to the non-sink visual
    tokens in proportion to their attention. ``text_sinks`` ``(B, K)`` (the released code:
    every other token above ``tau``, the first token among them) are scaled alike, their
    freed mass going to the same visual tokens.
    """
    has_sink = sinks.any(-1)[:, None, None, None]
    visual = visual[:, None, None].to(probs.dtype)
    sinks = (sinks[:, None, None] & (visual > 0)).to(probs.dtype)
    text = torch.zeros_like(sinks) if text_sinks is None else (text_sinks[:, None, None] & (visual == 0)).to(probs.dtype)
    rest = visual - sinks
    image = (probs * visual).sum(-1, keepdim=True)
    sink = (probs * sinks).sum(-1, keepdim=True)
    others = image - sink
    if rule == "paper":
        centric = others >= rho * image
    elif rule == "released":
        centric = (sink <= rho * image) & has_sink
    else:
        raise ValueError(f"VAR rule must be 'paper' or 'released', got {rule!r}")
    selected = (image >= min_image) & centric & (others > TINY)
    if rows is not None:
        selected = selected & rows[:, None, :, None]
    freed = moved * (sink + (probs * text).sum(-1, keepdim=True))
    edited = probs * (1 - moved * (sinks + text)) + (freed / others.clamp(min=TINY)) * probs * rest
    return torch.where(selected, edited, probs), selected[..., 0]


class VAR:
    """Visual attention redistribution on layers 2 .. L-2 (``variant="released"``: 2 .. L-1).

    ``variant="paper"`` follows the paper: ``p`` is the fraction of sink attention moved,
    a head is image-centric when at least ``rho`` of its image attention is on non-sink
    visual tokens, and only visual sinks give up mass. ``variant="released"`` computes what
    the authors' code does: ``p`` is the fraction kept (it ships 0.6, i.e. 40% moved), a head
    is image-centric when at most ``rho`` of its image attention is on visual sinks (and the
    layer has one), every token above ``tau`` (the first token too) is scaled by ``p`` and its
    freed mass goes to the non-sink visual tokens, and the last layer is edited as well.
    ``rho`` 0.5 is the paper's hallucination setting (0.8 general, 0.9 vision-centric).

    ``dims`` fixes the sink dimensions; by default they are the published table's, else
    the model's calibration file's (``directory``, default ``calibration/`` in the cache),
    else discovered at the first prompt over the middle layers (one 1-token forward of the
    LM) and saved there. ``consistency``: the share of middle layers in which the first token
    must exceed ``tau`` for a dimension to count.

    What one block found and ran with is its :class:`VARRun`, ``trace[var]``:

    >>> var = VAR(rho=0.5, p=0.6)
    >>> with vlm.use(var) as trace:
    ...     out = model.generate(**inputs, max_new_tokens=32)
    >>> trace[var].sinks[2], trace[var].settings["dims"], trace[var].settings["status"]
    """

    def __init__(self, rho: float = 0.5, p: float = 0.6, tau: float = 20.0,
                 variant: Literal["paper", "released"] = "paper", min_image: float = 0.2,
                 dims: tuple[int, ...] | None = None, consistency: float = 0.5,
                 directory: str | Path | None = None):
        if variant not in ("paper", "released"):
            raise ValueError(f"VAR variant must be 'paper' or 'released', got {variant!r}")
        for name, value in (("p", p), ("rho", rho), ("min_image", min_image), ("consistency", consistency)):
            if not 0 <= value <= 1:
                raise ValueError(f"VAR {name} must be in [0, 1], got {value}")
        if tau <= 0:
            raise ValueError(f"VAR tau must be positive, got {tau}")
        self.rho, self.p, self.tau, self.variant, self.min_image, self.dims = rho, p, tau, variant, min_image, dims
        self.consistency, self.directory = consistency, directory
        self.moved = p if variant == "paper" else 1 - p

    def attach(self, vlm, plan) -> VARRun:
        run = plan.trace[self] = VARRun(self, vlm, plan)
        return run


class VARRun(AttentionHook, LayerHook):
    """One block of :class:`VAR` (``trace[var]``): its hooks, ``sinks`` (edited layer -> each sample's
    visual sink positions, found at the latest prefill), ``text_sinks`` (the same for the other tokens
    above ``tau``, moved by the released variant only) and ``settings`` (what it ran with: the sink
    dimensions and where they came from, and ``status``, ``"sinks found"`` or ``"no sinks found"``
    with the reason in ``status_detail``)."""

    def __init__(self, var: VAR, vlm, plan):
        num_layers = vlm.num_layers
        last = num_layers - 1 if var.variant == "released" else num_layers - 2
        attention = set(vlm.attention_layers)  # a hybrid family's (Qwen3.5) other layers have no attention to edit
        self.layers = [index for index in range(2, last + 1) if index in attention]
        if not self.layers:
            raise ValueError(f"VAR edits the attention layers among 2 .. L-2; this model's {num_layers} layers have "
                             f"attention at {sorted(attention)}")
        self.var, self.vlm, self.state, self.num_layers = var, vlm, plan.state, num_layers
        self.signature = model_signature(vlm.model.config)
        self.dims: list[int] | None = None
        if var.dims is not None:
            self.dims, source = [int(d) for d in var.dims], "given"
        elif self.signature in PUBLISHED_SINK_DIMS:
            self.dims, source = list(PUBLISHED_SINK_DIMS[self.signature]), "published"
        else:
            source = "discovered at the first prompt"
        released = var.variant == "released"
        self.settings = {"method": "VAR", "variant": var.variant, "rho": var.rho, "p": var.p,
                         "p_meaning": "kept" if released else "moved", "moved": var.moved,
                         "tau": var.tau, "min_image": var.min_image, "layers": self.layers,
                         "head_rule": "visual sink share <= rho" if released else "non-sink visual share >= rho",
                         "moves_text_sinks": released, "dims": self.dims, "dims_source": source,
                         "dims_discovery": None, "status": None, "status_detail": None}
        if self.dims is None:
            self._use(model_sink_dims(vlm, None, var.tau, var.consistency, directory=var.directory))
        self.sinks: dict[int, list[torch.Tensor]] = {}
        self.text_sinks: dict[int, list[torch.Tensor]] = {}
        self._sink_masks, self._text_masks, self._visual, self._image_end = {}, {}, None, None
        for index in self.layers:
            plan.layer(index, vlm.layers[index], self)
            plan.attention(vlm.site(f"text.{index}"), self)

    def _use(self, found) -> None:
        """Take the dimensions of a :class:`~vlmtools.sinks.dims.ModelSinkDims` (None: not found yet)."""
        if found is None:
            return
        self.dims = list(found.dims)
        self.settings["dims"] = self.dims
        self.settings["dims_source"] = "cached" if found.source == "cached" else (
            "discovered" if found.path else "discovered (not cached: the model has no name)")
        self.settings["dims_discovery"] = {"file": found.path, "layers": found.layers,
                                           "consistency": found.consistency, "first_tokens": found.first_tokens,
                                           "strongest": found.strongest}

    def before_layer(self, index, hidden, kwargs):
        if self.state.step != 0:
            return  # sinks are frozen after prefill
        layout = self.state.layout
        if index == self.layers[0]:
            self._visual = visual_mask(layout)
            self._image_end = torch.tensor([int(s.visual_positions().max()) for s in layout.samples])
            if self.dims is None:
                first = torch.tensor([int(self.state.input_ids[b, s.first]) for b, s in enumerate(layout.samples)])
                self._use(model_sink_dims(self.vlm, first, self.var.tau, self.var.consistency,
                                          directory=self.var.directory))
        visual, text = [], []
        found = set()
        if self.dims:
            if hidden.shape[1] != layout.seq_len:  # a token drop shortened this layer: keyed by original position
                kept = self.state.kept_keys[index].to(hidden.device)
                hidden = hidden.new_zeros(hidden.shape[0], layout.seq_len, hidden.shape[2]).scatter_(
                    1, kept[..., None].expand(-1, -1, hidden.shape[2]), hidden)  # zeros where dropped: no sink
            tensors = SinkTensors(layout, self.num_layers, hidden={index: hidden}, signature=self.signature)
            criterion = SinkDimensions(tau=self.var.tau, dims=tuple(self.dims), layers=(index,))
            found = {(f.sample, f.token) for f in criterion.evaluate(tensors).findings}
        for b, sample in enumerate(layout.samples):
            image = set(sample.visual_positions().tolist())
            tokens = sorted(t for s, t in found if s == b)
            visual.append(torch.tensor([t for t in tokens if t in image], dtype=torch.long))
            text.append(torch.tensor([t for t in tokens if t not in image], dtype=torch.long))
        self.sinks[index], self.text_sinks[index] = visual, text
        self._sink_masks[index] = key_mask(visual, layout.seq_len)
        self._text_masks[index] = key_mask(text, layout.seq_len)
        if index == self.layers[-1]:
            self._report()

    def _report(self) -> None:
        """``status``: whether this prompt has a visual sink in any edited layer; a warning when not."""
        var = self.var
        if any(mask.any() for mask in self._sink_masks.values()):
            self.settings["status"], self.settings["status_detail"] = "sinks found", None
            return
        if not self.dims:
            width = self.vlm.model.config.get_text_config().hidden_size
            discovery = self.settings["dims_discovery"] or {}
            detail = (f"no sink dimension: the first token's |h_d|/rms(h) exceeds tau={var.tau:g} in under "
                      f"{var.consistency:.0%} of layers {discovery.get('layers')} (strongest [dim, median ratio]: "
                      f"{discovery.get('strongest')})")
            if var.tau >= width**0.5:
                detail += f"; |h_d|/rms(h) cannot exceed sqrt(hidden size) = {width**0.5:.1f}, so lower tau"
        else:
            detail = f"no visual token has |h_d|/rms(h) > tau={var.tau:g} on dims {self.dims} in layers {self.layers}"
        self.settings["status"], self.settings["status_detail"] = "no sinks found", detail
        warnings.warn(f"VAR: {detail}; attention is left as it is", NoSinksWarning, stacklevel=2)

    def rows(self, call):
        if not self._sink_masks[call.site.index].any():
            return None  # no visual sink in this layer: nothing to move (the fused kernel runs)
        if self.state.step > 0:
            return torch.arange(call.q_len, device=call.query.device)
        # prefill: only queries after the image (text that reads it)
        positions = key_positions(self.state, call.site.index, call.k_len)
        if positions is not None:  # a token drop shortened this layer: its rows stand at the kept positions
            return (positions.cpu() > self._image_end[:, None]).any(0).nonzero()[:, 0].to(call.query.device)
        return torch.arange(int(self._image_end.min()) + 1, call.q_len, device=call.query.device)

    def edit_probs(self, call, rows, probs):
        device = probs.device
        after = None
        index, k_len, state = call.site.index, call.k_len, self.state
        if state.step == 0:
            positions = key_positions(state, index, k_len)
            at = rows[None].cpu() if positions is None else positions.cpu()[:, rows.cpu()]
            after = at > self._image_end[:, None]
        released = self.var.variant == "released"
        edited, _ = redistribute(probs, keys_of(self._visual, state, index, k_len, device),
                                 keys_of(self._sink_masks[index], state, index, k_len, device), self.var.moved,
                                 self.var.rho, self.var.min_image, None if after is None else after.to(device),
                                 keys_of(self._text_masks[index], state, index, k_len, device) if released else None,
                                 "released" if released else "paper")
        return edited
