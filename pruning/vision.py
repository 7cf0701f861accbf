"""Hosts that rank inside the vision encoder: FasterVLM and VisionZip.

Both read the [CLS] query row of the encoder block whose output feeds the projector
(-2 for LLaVA-1.5: the second-to-last layer) and drop at the LM's input (layer 0), so
the whole LM runs on the kept tokens. The family's adapter says which block that is and
puts the encoder's per-token values where the LM's visual tokens are (LLaVA-NeXT: base
tile, then the stitched and unpadded anyres grid, whose newlines are layout tokens,
always kept); a family without such a [CLS] row (Qwen2-VL / Qwen2.5-VL) is refused with
the adapter's reason.

As their released code hands the LM a shorter input sequence, the kept tokens get
consecutive positions by default (``positions="compact"``, :class:`~vlmtools.drop.DropTokens`);
``positions="original"`` keeps each token's own position id.
"""
from __future__ import annotations

import torch

from vlmtools.adapters import UnsupportedModel
from vlmtools.adapters.vision import join_samples

from .host import Host, SiteRows, at_present, merge_into


def _cls_row(call):
    return torch.zeros(1, dtype=torch.long, device=call.query.device)


class _ClsHost(Host):
    keys_needed = False

    def __init__(self, keep: int | float = 64, positions: str = "compact", **kwargs):
        if positions not in ("compact", "original"):
            raise ValueError(f"positions must be 'compact' (released code: the LM gets a shorter sequence) or "
                             f"'original' (each kept token keeps its position id), got {positions!r}")
        super().__init__(keep, (0,), **kwargs)
        self.positions = positions

    @classmethod
    def refusal(cls, vlm) -> str | None:
        refusal = super().refusal(vlm)
        if refusal is None:
            try:
                vlm.adapter.vision_encoder().cls_block(vlm.model)
            except UnsupportedModel as reason:
                return f"{cls.name} ranks by the vision encoder's [CLS] attention; {vlm.family}: {reason}"
        return refusal

    def scorers(self, run, vlm, plan):
        block = vlm.adapter.vision.cls_block(vlm.model)
        return [plan.attention(vlm.site(f"vision.{block}"), SiteRows(_cls_row, keys=self.keys_needed))]

    @staticmethod
    def cls_scores(run, layout, kept) -> torch.Tensor:
        _, probs = run.scorers[0].latest()  # (tiles, 1, 1 + patches)
        return at_present(visual_order(run, probs[:, 0, 1:], layout), layout, kept)

    def score(self, run, stage, hidden, kept, layout, targets):
        return self.cls_scores(run, layout, kept)


class FasterVLM(_ClsHost):
    """FasterVLM: keep the visual tokens with the largest [CLS] attention (head mean) at the LM input.

    As the released code: the [CLS] query row of the encoder block whose output the projector reads
    (LLaVA-1.5: ``vision_feature_layer=-2``, the second-to-last block), post-softmax, averaged over heads,
    patches only; the kept tokens reach the LM at consecutive positions (``positions="compact"``).
    The released code keeps its top tokens per encoder crop on LLaVA-NeXT; here one ranking over each
    sample's visual tokens (base view and stitched grid).
    """

    name = "fastervlm"

    def options(self):
        return {"site": "[CLS] row of the vision_feature_layer (paper and released code: second-to-last layer)",
                "heads": "mean (released code)", "ranking": "per sample (released code, LLaVA-NeXT: per crop)"}


class VisionZip(_ClsHost):
    """VisionZip: ``dominant`` share of the budget by [CLS] attention, the rest *contextual*:
    evenly strided targets among the remaining tokens, each merged with the remaining tokens
    most similar to it (cosine of the encoder layer's head-mean keys).

    As the released code: dominant = top [CLS] attention (summed over heads) at the encoder block the
    projector reads; the remaining tokens in raster order, targets every ``len // contextual``-th of
    them from the first; each other remaining token goes to the target of largest key cosine; a
    target becomes ``target + mean(assigned)`` (``merge="sum"``); the LM gets the kept tokens at
    consecutive positions (``positions="compact"``).

    Differences: paper 64 = 54 dominant + 10 contextual; the released code counts the [CLS] token as
    one of the dominant ones (53 patches + [CLS]) and puts the contextual tokens after the dominant
    ones, here 54 patches and each contextual token at its target's place in raster order. The
    released code merges CLIP features before the projector; here merging acts on the projected
    features at the LM input (the projector is per token, so only its non-linearity differs). With
    debiasing of letterbox padding, padding tokens are neither targets nor merged (they carry no
    content). LLaVA-NeXT: the released code selects per encoder crop; here over each sample's tokens.
    """

    name = "visionzip"
    keys_needed = True

    def __init__(self, keep: int | float = 64, dominant: float = 54 / 64, merge: str = "sum", **kwargs):
        if not 0 < dominant <= 1 or merge not in ("sum", "mean"):
            raise ValueError("dominant must be in (0, 1] and merge 'sum' or 'mean'")
        super().__init__(keep, **kwargs)
        self.dominant, self.merge = dominant, merge

    def select(self, run, sample, scores, columns, hidden, target):
        dominant = max(1, min(target, round(target * self.dominant)))
        order = scores.argsort(descending=True, stable=True)
        rest = order[dominant:].sort().values
        padded = run.padded[sample] if run.padded else None
        if padded is not None and len(padded):  # debiased letterbox padding: no content to merge or merge into
            rest = rest[~torch.isin(run.present[sample][columns[rest]], padded)]
        contextual = min(target - dominant, len(rest))
        if not contextual:
            return columns[order[:dominant]], None
        targets = rest[::max(1, len(rest) // contextual)][:contextual]
        sources = rest[~torch.isin(rest, targets)]
        candidates = hidden[columns]
        features = visual_order(run, run.scorers[0].keys.float().mean(1)[:, 1:], run.state.layout)[sample]
        merged = merge_into(candidates, targets, sources, features.to(hidden.device), self.merge)
        return (torch.cat([columns[order[:dominant]], columns[targets]]),
                torch.cat([candidates[order[:dominant]].float(), merged]))

    def options(self):
        return {"site": "[CLS] row of the vision_feature_layer", "dominant": self.dominant,
                "merge": f"{self.merge} ('sum' = released code) of projected features by key cosine"}


def visual_order(run, values: torch.Tensor, layout) -> list[torch.Tensor]:
    """Per-sequence encoder values ``(sequences, patches, ...)`` -> per sample, in the order of its visual
    tokens (the family's mapping)."""
    to_lm = run.vlm.adapter.vision.to_lm
    return join_samples(to_lm(run.vlm.model, values.flatten(0, 1), layout.images()), layout)
