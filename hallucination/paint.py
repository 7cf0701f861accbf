"""PAINT (Arif et al., "Fixing Imbalanced Attention to Mitigate In-Context Hallucination
of Large Vision-Language Model"): raise the LLM's attention logits on the visual tokens
the vision encoder itself found important.

Why: the vision encoder's CLS token knows which patches matter: at its first layer it
attends to local detail (the top quarter of patches: "local" tokens), at its
second-to-last layer to a few patches that summarise the image (outliers: "summary"
tokens). The LLM, in contrast, drifts away from the image as it generates; adding
``alpha*|z|`` to the last query row's pre-softmax logits on local tokens and
``beta*|z|`` on summary tokens pulls it back to both kinds of evidence.

Qwen2-VL and Qwen2.5-VL towers have no CLS token; there (our substitute, recorded in
``settings["scores"]``) a patch's score is the mean attention it receives from the
patches of its image (window, for Qwen2.5-VL's windowed layers), averaged over the
2x2 patches the merger fuses into one LLM token.

Head-specific modulation (in the paper, not in the released code; the definition is
ours): a head's visual sensitivity is its attention mass on the image in the row being
edited, before the edit, divided by the mean of that mass over the layer's heads;
``alpha`` is multiplied by it, so heads that already read the image are pushed harder
and text-only heads barely change.
"""
from __future__ import annotations

import math

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

from vlmtools.plan import AttentionHook
from vlmtools.record import RecordColumnMass, RecordRows

from .common import key_mask, last_row, visual_mask, widen

CLS_FAMILIES = ("llava", "llava_next")
MEAN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


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


class PAINT(AttentionHook):
    """PAINT on LLM layers 2 .. L-1, last query row, every step.

    >>> with vlm.use(PAINT(alpha=0.7, beta=0.4)):
    ...     out = model.generate(**inputs, max_new_tokens=32)
    """

    def __init__(self, alpha: float = 0.7, beta: float = 0.4, head_modulation: bool = True, top: float = 0.25,
                 whisker: float = 1.5):
        if not 0 < top <= 1:
            raise ValueError(f"PAINT top must be in (0, 1], got {top}")
        if whisker < 0:
            raise ValueError(f"PAINT whisker must not be negative, got {whisker}")
        self.alpha, self.beta, self.head_modulation, self.top, self.whisker = alpha, beta, head_modulation, top, whisker
        self.settings: dict = {}

    def attach(self, vlm, plan) -> None:
        if vlm.family not in CLS_FAMILIES + MEAN_FAMILIES:
            raise NotImplementedError(f"PAINT reads the vision encoder's attention; {vlm.family} is not supported "
                                      f"({', '.join(CLS_FAMILIES + MEAN_FAMILIES)} are)")
        depth = len(vlm.adapter.blocks(vlm.model, "vision"))
        self.vision_sites = ["vision.0", f"vision.{max(depth - 2, 0)}"]
        sites = sorted(set(self.vision_sites))
        if vlm.family in CLS_FAMILIES:
            RecordRows(sites, queries=torch.tensor([0])).attach(vlm, plan)
        else:
            RecordColumnMass(sites).attach(vlm, plan)
        self.vlm, self.trace, self.state = vlm, plan.trace, plan.state
        self.layers = list(range(2, vlm.num_layers))
        self.settings = {"method": "PAINT", "alpha": self.alpha, "beta": self.beta,
                         "head_modulation": self.head_modulation, "top": self.top, "whisker": self.whisker,
                         "vision_sites": self.vision_sites, "layers": self.layers,
                         "scores": "CLS attention" if vlm.family in CLS_FAMILIES else "mean attention received",
                         "variant": "paper" if self.head_modulation else "released"}
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
            loc, summ = token_sets(scores0, scores1, self.top, self.whisker)
            local.append(image.positions[loc])
            summary.append(image.positions[summ])
        per_sample = [len(sample.images) for sample in layout.samples]
        self.local = key_mask([torch.cat(p) for p in _regroup(local, per_sample)], layout.seq_len)
        self.summary = key_mask([torch.cat(p) for p in _regroup(summary, per_sample)], layout.seq_len)
        self.visual = visual_mask(layout)

    def _scores(self, site: str, images) -> list[torch.Tensor]:
        """Each image's token scores at a vision site, head-averaged, in layout order."""
        config = self.vlm.model.config
        if self.vlm.family in MEAN_FAMILIES:
            calls = self.trace[f"{site}.column_mass"]
            fresh, self._seen[site] = calls[self._seen[site]:], len(calls)  # this prompt's images / windows
            received = torch.cat([mass.mean.mean(1)[0] for mass in fresh]).cpu()
            return _merged_scores(received, images, config.vision_config, self.vlm.family == "qwen2_5_vl")
        cls = self.trace[f"{site}.rows"][-1].float().mean(1)[:, 0].cpu()  # (tiles, 1 + patches)
        if config.vision_feature_select_strategy == "default":
            cls = cls[:, 1:]
        if self.vlm.family == "llava":
            return list(cls)
        return _anyres_scores(cls, images, config.vision_config.image_size // config.vision_config.patch_size)

    def rows(self, call):
        if self.state.step == 0 and self._layout is not self.state.layout:
            self._new_prompt()
        return last_row(call)

    def edit_logits(self, call, rows, logits):
        device = logits.device
        scale = visual_sensitivity(logits, widen(self.visual, call.k_len, device)) if self.head_modulation else None
        return boost(logits, widen(self.local, call.k_len, device), widen(self.summary, call.k_len, device),
                     self.alpha, self.beta, scale)


def _regroup(items: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for count in counts:
        out.append(items[start:start + count])
        start += count
    return out


def _anyres_scores(cls: torch.Tensor, images, side: int) -> list[torch.Tensor]:
    """LLaVA-NeXT: per-tile scores ``(tiles, side*side)`` to each image's token order
    (base grid, then the stitched tile grid cropped as ``unpad_image`` crops it)."""
    scores, tile = [], 0
    for image in images:
        rows, cols = image.tiles[1]
        tiles_h, tiles_w = -(-rows // side), -(-cols // side)
        base, grid = cls[tile], cls[tile + 1: tile + 1 + tiles_h * tiles_w]
        tile += 1 + tiles_h * tiles_w
        grid = grid.view(tiles_h, tiles_w, side, side).permute(0, 2, 1, 3).reshape(tiles_h * side, tiles_w * side)
        top, left = (tiles_h * side - rows) // 2, (tiles_w * side - cols) // 2
        scores.append(torch.cat([base, grid[top:top + rows, left:left + cols].flatten()]))
    if tile != cls.shape[0]:
        raise ValueError(f"PAINT: {cls.shape[0]} vision tiles recorded but the layout's grids account for {tile}; "
                         "this image's anyres padding spans a whole tile")
    return scores


def _merged_scores(received: torch.Tensor, images, vision, windowed: bool) -> list[torch.Tensor]:
    """Qwen-VL: per-patch scores of the whole batch (window order for Qwen2.5-VL) to each
    image's merged tokens, averaging each merge group of ``m x m`` patches."""
    group = vision.spatial_merge_size ** 2
    merged = received.view(-1, group).mean(-1)
    if windowed:  # the tower runs on tokens reordered window by window
        m = vision.spatial_merge_size
        grid = torch.tensor([[t, h * m, w * m] for t, h, w in (image.thw for image in images)])
        order, _ = get_vision_window_index(grid, m, vision.window_size, vision.patch_size)
        merged = torch.empty_like(merged).index_copy_(0, order.cpu(), merged)
    return list(merged.split([len(image) for image in images]))
