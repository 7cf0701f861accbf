"""Hosts that rank inside the vision encoder: FasterVLM and VisionZip.

Both read the [CLS] query row of the encoder layer whose output feeds the projector
(``vision_feature_layer``, -2 for LLaVA-1.5: the second-to-last layer) and drop at the
LM's input (layer 0), so the whole LM runs on the kept tokens. Only encoders with a
[CLS] token qualify: LLaVA-1.5 and LLaVA-NeXT (CLIP). Qwen2-VL / Qwen2.5-VL encoders
have none: these hosts refuse them with a clear error (use an LM-side host there).

LLaVA-NeXT: the encoder sees each image as a base tile plus anyres tiles; scores are
put where the model puts the tiles' features (base grid, then the stitched and
unpadded grid, whose newline tokens are layout tokens, always kept).
"""
from __future__ import annotations

import math

import torch

from .host import Host, SiteRows, at_present, merge_into


def _cls_row(call):
    return torch.zeros(1, dtype=torch.long, device=call.query.device)


class _ClsHost(Host):
    families = ("llava", "llava_next")
    keys_needed = False

    def __init__(self, keep: int | float = 64, **kwargs):
        super().__init__(keep, (0,), **kwargs)

    unsupported = ("It ranks by the vision encoder's [CLS] attention and Qwen2-VL / Qwen2.5-VL encoders have no [CLS] "
                   "token: use FastV, PDrop, SparseVLM or DART there.")

    def scorers(self, run, vlm, plan):
        config = vlm.model.config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise NotImplementedError(f"{self.name}: needs one vision_feature_layer and the 'default' strategy "
                                      "(CLS dropped), as LLaVA-1.5 / NeXT ship")
        depth = len(vlm.adapter.blocks(vlm.model, "vision"))
        vision_layer = config.vision_feature_layer % (depth + 1) - 1
        return [plan.attention(vlm.site(f"vision.{vision_layer}"), SiteRows(_cls_row, keys=self.keys_needed))]

    @staticmethod
    def cls_scores(run, layout, kept) -> torch.Tensor:
        _, probs = run.scorers[0].latest()  # (tiles, 1, 1 + patches)
        return at_present(visual_order(probs[:, 0, 1:], layout), layout, kept)

    def score(self, run, stage, hidden, kept, layout, targets):
        return self.cls_scores(run, layout, kept)


class FasterVLM(_ClsHost):
    """FasterVLM: keep the visual tokens with the largest [CLS] attention (head mean) at the LM input."""

    name = "fastervlm"

    def options(self):
        return {"site": "[CLS] row of the vision_feature_layer (paper: second-to-last layer)", "heads": "mean"}


class VisionZip(_ClsHost):
    """VisionZip: ``dominant`` share of the budget by [CLS] attention, the rest *contextual*:
    evenly strided targets among the remaining tokens, each merged with the remaining tokens
    most similar to it (cosine of the encoder layer's head-mean keys).

    Paper: 64 = 54 dominant + 10 contextual. The released code merges CLIP features before the
    projector as ``target + mean(assigned)``; here merging acts on the projected features at
    the LM input (the projector is per token, so only its non-linearity differs).
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
        contextual = min(target - dominant, len(rest))
        if not contextual:
            return columns[order[:dominant]], None
        targets = rest[::max(1, len(rest) // contextual)][:contextual]
        sources = rest[~torch.isin(rest, targets)]
        candidates = hidden[columns]
        features = visual_order(run.scorers[0].keys.float().mean(1)[:, 1:], run.state.layout)[sample]
        merged = merge_into(candidates, targets, sources, features.to(hidden.device), self.merge)
        return (torch.cat([columns[order[:dominant]], columns[targets]]),
                torch.cat([candidates[order[:dominant]].float(), merged]))

    def options(self):
        return {"site": "[CLS] row of the vision_feature_layer", "dominant": self.dominant,
                "merge": f"{self.merge} ('sum' = released code) of projected features by key cosine"}


def visual_order(values: torch.Tensor, layout) -> list[torch.Tensor]:
    """Per-tile values ``(tiles, patches, ...)`` -> per sample, in the order of its visual tokens."""
    out, tile = [], 0
    for sample in layout.samples:
        parts = []
        for image in sample.images:
            if not image.tiles:
                parts.append(values[tile])
                tile += 1
                continue
            (height, width), (rows, cols) = image.tiles
            grid_h, grid_w = math.ceil(rows / height), math.ceil(cols / width)
            stitched = values[tile + 1:tile + 1 + grid_h * grid_w]
            stitched = stitched.reshape(grid_h, grid_w, height, width, *values.shape[2:]).transpose(1, 2)
            stitched = stitched.reshape(grid_h * height, grid_w * width, *values.shape[2:])
            top, left = (grid_h * height - rows) // 2, (grid_w * width - cols) // 2
            parts += [values[tile], stitched[top:top + rows, left:left + cols].flatten(0, 1)]
            tile += 1 + grid_h * grid_w
        out.append(torch.cat(parts) if parts else values.new_empty(0, *values.shape[2:]))
    if tile != len(values):
        raise ValueError(f"the vision encoder saw {len(values)} tiles but the prompt's layout accounts for {tile}")
    return out
