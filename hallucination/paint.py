"""PAINT (Arif et al., "Fixing Imbalanced Attention to Mitigate In-Context Hallucination
of Large Vision-Language Model"): raise the LLM's attention logits on the visual tokens
the vision encoder itself found important.

Why: the vision encoder's CLS token knows which patches matter: at its first layer it
attends to local detail (the top quarter of patches: "local" tokens), at its
second-to-last layer to a few patches that summarise the image (outliers: "summary"
tokens). The LLM, in contrast, drifts away from the image as it generates; adding
``alpha*|z|`` to the last query row's pre-softmax logits on local tokens and
``beta*|z|`` on summary tokens pulls it back to both kinds of evidence.

Where the family's adapter says the encoder has no CLS token (Qwen2-VL, Qwen2.5-VL), a
patch's score is the mean attention it receives from the patches of its image (window,
for Qwen2.5-VL's windowed layers): our substitute, recorded in ``settings["scores"]``.
The adapter puts encoder scores on the LLM's tokens (LLaVA-NeXT tiles, Qwen-VL merge
groups averaged, Qwen2.5-VL windows back in raster order) and refuses families it cannot.

Head-specific modulation (in the paper, not in the released code; the definition is
ours): a head's visual sensitivity is its attention mass on the image in the row being
edited, before the edit, divided by the mean of that mass over the layer's heads;
``alpha`` is multiplied by it, so heads that already read the image are pushed harder
and text-only heads barely change.
"""
from __future__ import annotations

import math

import torch

from vlmtools.adapters.vision import join_samples
from vlmtools.plan import AttentionHook
from vlmtools.record import RecordColumnMass, RecordRows, last_row

from .common import key_mask, keys_of, visual_mask


def token_sets(first: torch.Tensor, penultimate: torch.Tensor, top: float = 0.25,
               whisker: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(local, summary)`` bool masks over one image's tokens from CLS attention.

    ``first`` / ``penultimate``: CLS attention on each token at encoder layer 0 and at
    the second-to-last layer. Summary: ``penultimate > Q3 + whisker * IQR``. Local: the
    top ``top`` fraction of ``first`` (rounded up), minus the summary tokens.
    """
    q1, q3 = torch.quantile(penultimate.float(), torch.tensor([0.25, 0.75]))
    summary = penultimate > q3 + whisker * (q3 - q1)
    local = torch.zeros_like(summary)
    local[first.topk(math.ceil(top * first.numel())).indices] = True
    return local & ~summary, summary


def visual_sensitivity(logits: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """``(B, H, R)``: each head's attention mass on ``visual`` keys over the heads' mean."""
    mass = (logits.softmax(-1) * visual[:, None, None]).sum(-1)
    return mass / mass.mean(1, keepdim=True).clamp(min=1e-12)


def boost(logits: torch.Tensor, local: torch.Tensor, summary: torch.Tensor, alpha: float, beta: float,
          head_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``z + alpha_h*|z|`` on local and ``z + beta*|z|`` on summary keys of rows ``(B, H, R, K)``.

    ``local`` / ``summary`` ``(B, K)``; ``alpha_h = alpha * head_scale`` ``(B, H, R)`` (or ``alpha``).
    """
    alpha = alpha if head_scale is None else alpha * head_scale[..., None]
    gain = alpha * local[:, None, None] + beta * summary[:, None, None]
    return logits + gain * logits.abs()


class PAINT:
    """PAINT on LLM layers 2 .. L-1, last query row, every step.

    What one block computed is its :class:`PAINTRun`, ``trace[paint]``:

    >>> paint = PAINT(alpha=0.7, beta=0.4)
    >>> with vlm.use(paint) as trace:
    ...     out = model.generate(**inputs, max_new_tokens=32)
    >>> trace[paint].local, trace[paint].summary
    """

    def __init__(self, alpha: float = 0.7, beta: float = 0.4, head_modulation: bool = True, top: float = 0.25,
                 whisker: float = 1.5):
        if not 0 < top <= 1:
            raise ValueError(f"PAINT top must be in (0, 1], got {top}")
        if whisker < 0:
            raise ValueError(f"PAINT whisker must not be negative, got {whisker}")
        self.alpha, self.beta, self.head_modulation, self.top, self.whisker = alpha, beta, head_modulation, top, whisker

    def attach(self, vlm, plan) -> PAINTRun:
        run = plan.trace[self] = PAINTRun(self, vlm, plan)
        return run


class PAINTRun(AttentionHook):
    """One block of :class:`PAINT` (``trace[paint]``): its hooks, ``local`` and ``summary`` (``(B, L)``
    bool masks of the latest prompt's local and summary tokens) and ``settings``."""

    def __init__(self, paint: PAINT, vlm, plan):
        self.encoder = vlm.adapter.vision_encoder()  # UnsupportedModel: the family's reason
        depth = len(vlm.adapter.blocks(vlm.model, "vision"))
        self.vision_sites = ["vision.0", f"vision.{max(depth - 2, 0)}"]
        sites = sorted(set(self.vision_sites))
        if self.encoder.cls:
            RecordRows(sites, queries=torch.tensor([0])).attach(vlm, plan)
        else:
            RecordColumnMass(sites).attach(vlm, plan)
        self.paint, self.vlm, self.trace, self.state = paint, vlm, plan.trace, plan.state
        self.layers = [index for index in range(2, vlm.num_layers) if index in set(vlm.attention_layers)]
        self.settings = {"method": "PAINT", "alpha": paint.alpha, "beta": paint.beta,
                         "head_modulation": paint.head_modulation, "top": paint.top, "whisker": paint.whisker,
                         "vision_sites": self.vision_sites, "layers": self.layers,
                         "scores": "CLS attention" if self.encoder.cls else "mean attention received",
                         "variant": "paper" if paint.head_modulation else "released"}
        self.local: torch.Tensor | None = None
        self.summary: torch.Tensor | None = None
        self._layout, self._seen = None, dict.fromkeys(sites, 0)
        for index in self.layers:
            plan.attention(vlm.site(f"text.{index}"), self)

    def _new_prompt(self) -> None:
        layout = self._layout = self.state.layout
        images = [image for sample in layout.samples for image in sample.images]
        scores = {site: self._scores(site, images) for site in set(self.vision_sites)}
        first, penultimate = (scores[site] for site in self.vision_sites)
        local, summary = [], []
        for image, scores0, scores1 in zip(images, first, penultimate):
            loc, summ = token_sets(scores0, scores1, self.paint.top, self.paint.whisker)
            local.append(image.positions[loc])
            summary.append(image.positions[summ])
        self.local = key_mask(join_samples(local, layout), layout.seq_len)
        self.summary = key_mask(join_samples(summary, layout), layout.seq_len)
        self.visual = visual_mask(layout)

    def _scores(self, site: str, images) -> list[torch.Tensor]:
        """Each image's token scores at a vision site, head-averaged, in layout order."""
        if self.encoder.cls:
            values = self.trace[f"{site}.rows"][-1].float().mean(1)[:, 0, 1:].cpu()  # (sequences, patches)
        else:
            calls = self.trace[f"{site}.column_mass"]
            fresh, self._seen[site] = calls[self._seen[site]:], len(calls)  # this prompt's images / windows
            values = torch.cat([mass.mean.mean(1).flatten() for mass in fresh]).cpu()  # sequence after sequence
        return self.encoder.to_lm(self.vlm.model, values.flatten(), images)  # the family's token order

    def rows(self, call):
        if self.state.step == 0 and self._layout is not self.state.layout:
            self._new_prompt()
        return last_row(call)

    def edit_logits(self, call, rows, logits):
        device = logits.device
        paint = self.paint
        index, k_len, state = call.site.index, call.k_len, self.state
        scale = visual_sensitivity(logits, keys_of(self.visual, state, index, k_len, device)) if paint.head_modulation else None
        return boost(logits, keys_of(self.local, state, index, k_len, device),
                     keys_of(self.summary, state, index, k_len, device), paint.alpha, paint.beta, scale)
