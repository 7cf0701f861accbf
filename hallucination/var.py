"""VAR (Kang et al., "See What You Are Told: Visual Attention Sink in Large Multimodal
Models", ICLR 2025): take attention off visual sink tokens and give it to the rest of
the image.

Why: a few visual tokens carry the same massive "sink dimensions" as the BOS sink and
soak up attention while holding little image content. In heads that are already
looking at the image (image-centric heads), moving part of that mass onto the other
visual tokens makes the model read more of the image; the row sum is unchanged, so
the rest of the computation sees an ordinary attention distribution.

Sinks come from the shared detector (:func:`vlmtools.sinks.dims.visual_sink_positions`):
at prefill, on the input of each edited layer, the visual tokens whose sink-dimension
score exceeds ``tau`` in that layer (as the authors' code does, layer by layer, so no
second forward is needed); they stay frozen for the decoding steps.
"""
from __future__ import annotations

from typing import Literal

import torch

from vlmtools.plan import AttentionHook, LayerHook
from vlmtools.sinks.base import SinkTensors
from vlmtools.sinks.dims import PUBLISHED_SINK_DIMS, SinkDimensions, model_signature, visual_sink_positions

from .common import key_mask, visual_mask, widen

TINY = 1e-12


def redistribute(probs: torch.Tensor, visual: torch.Tensor, sinks: torch.Tensor, moved: float, rho: float,
                 min_image: float = 0.2, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VAR's edit of post-softmax rows; returns ``(edited, selected)``.

    ``probs`` ``(B, H, R, K)``; ``visual`` / ``sinks`` ``(B, K)`` bool (sinks among the
    visual tokens); ``rows`` ``(B, R)`` bool marks the rows that may change. A
    (sample, head, row) is image-centric (``selected``, ``(B, H, R)``) when its image
    mass is at least ``min_image`` and the share of it on non-sink visual tokens at
    least ``rho``. There, sink columns are scaled by ``1 - moved`` and the freed mass
    goes to the non-sink visual tokens in proportion to their attention.
    """
    visual = visual[:, None, None].to(probs.dtype)
    sinks = (sinks[:, None, None] & (visual > 0)).to(probs.dtype)
    rest = visual - sinks
    image = (probs * visual).sum(-1, keepdim=True)
    sink = (probs * sinks).sum(-1, keepdim=True)
    others = image - sink
    selected = (image >= min_image) & (others >= rho * image) & (others > TINY)
    if rows is not None:
        selected = selected & rows[:, None, :, None]
    edited = probs * (1 - moved * sinks) + (moved * sink / others.clamp(min=TINY)) * probs * rest
    return torch.where(selected, edited, probs), selected[..., 0]


class VAR:
    """Visual attention redistribution on layers 2 .. L-2 (``variant="released"``: 2 .. L-1).

    ``p``: the paper's meaning is the fraction of sink attention moved; the released
    code's is the fraction kept (it ships 0.6, i.e. 40% moved). ``rho`` 0.5 is the
    paper's hallucination setting (0.8 general, 0.9 vision-centric). ``dims`` fixes the
    sink dimensions; by default the detector uses the published table, else discovers
    them on each layer's input.

    What one block found and ran with is its :class:`VARRun`, ``trace[var]``:

    >>> var = VAR(rho=0.5, p=0.6)
    >>> with vlm.use(var) as trace:
    ...     out = model.generate(**inputs, max_new_tokens=32)
    >>> trace[var].sinks[2], trace[var].settings
    """

    def __init__(self, rho: float = 0.5, p: float = 0.6, tau: float = 20.0,
                 variant: Literal["paper", "released"] = "paper", min_image: float = 0.2,
                 dims: tuple[int, ...] | None = None):
        if variant not in ("paper", "released"):
            raise ValueError(f"VAR variant must be 'paper' or 'released', got {variant!r}")
        for name, value in (("p", p), ("rho", rho), ("min_image", min_image)):
            if not 0 <= value <= 1:
                raise ValueError(f"VAR {name} must be in [0, 1], got {value}")
        if tau <= 0:
            raise ValueError(f"VAR tau must be positive, got {tau}")
        self.rho, self.p, self.tau, self.variant, self.min_image, self.dims = rho, p, tau, variant, min_image, dims
        self.moved = p if variant == "paper" else 1 - p

    def attach(self, vlm, plan) -> VARRun:
        run = plan.trace[self] = VARRun(self, vlm, plan)
        return run


class VARRun(AttentionHook, LayerHook):
    """One block of :class:`VAR` (``trace[var]``): its hooks, ``sinks`` (edited layer -> each sample's
    visual sink positions, found at the latest prefill) and ``settings`` (what it ran with, the sink
    dimensions each layer used included)."""

    def __init__(self, var: VAR, vlm, plan):
        num_layers = vlm.num_layers
        last = num_layers - 1 if var.variant == "released" else num_layers - 2
        self.layers = list(range(2, last + 1))
        if not self.layers:
            raise ValueError(f"VAR edits layers 2 .. L-2; this model has only {num_layers} layers")
        self.var, self.state, self.num_layers = var, plan.state, num_layers
        self.signature = model_signature(vlm.model.config)
        source = "given" if var.dims is not None else (
            "published" if self.signature in PUBLISHED_SINK_DIMS else "discovered per layer at prefill")
        self.settings = {"method": "VAR", "variant": var.variant, "rho": var.rho, "p": var.p,
                         "p_meaning": "moved" if var.variant == "paper" else "kept", "moved": var.moved,
                         "tau": var.tau, "min_image": var.min_image, "layers": self.layers,
                         "dims": list(var.dims or PUBLISHED_SINK_DIMS.get(self.signature, ())),
                         "dims_source": source, "dims_by_layer": {}}
        self.sinks: dict[int, list[torch.Tensor]] = {}
        self._sink_masks, self._visual, self._image_end = {}, None, None
        for index in self.layers:
            plan.layer(index, vlm.layers[index], self)
            plan.attention(vlm.site(f"text.{index}"), self)

    def before_layer(self, index, hidden, kwargs):
        if self.state.step != 0:
            return  # sinks are frozen after prefill
        layout = self.state.layout
        if index == self.layers[0]:
            self._visual = visual_mask(layout)
            self._image_end = torch.tensor([int(s.visual_positions().max()) for s in layout.samples])
        tensors = SinkTensors(layout, self.num_layers, hidden={index: hidden}, signature=self.signature)
        dims, _ = SinkDimensions(tau=self.var.tau, dims=self.var.dims, layers=(index,)).resolve_dims(tensors)
        self.settings["dims_by_layer"][index] = list(dims)
        sinks = visual_sink_positions({index: hidden}, layout, self.signature, self.num_layers, tau=self.var.tau,
                                      dims=dims, layers=(index,))
        self.sinks[index] = sinks
        self._sink_masks[index] = key_mask(sinks, layout.seq_len)

    def rows(self, call):
        if self.state.step > 0:
            return torch.arange(call.q_len, device=call.query.device)
        # prefill: only queries after the image (text that reads it)
        return torch.arange(int(self._image_end.min()) + 1, call.q_len, device=call.query.device)

    def edit_probs(self, call, rows, probs):
        device = probs.device
        after = None
        if self.state.step == 0:
            after = rows[None].cpu() > self._image_end[:, None]
        edited, _ = redistribute(probs, widen(self._visual, call.k_len, device),
                                 widen(self._sink_masks[call.site.index], call.k_len, device), self.var.moved,
                                 self.var.rho, self.var.min_image, None if after is None else after.to(device))
        return edited
