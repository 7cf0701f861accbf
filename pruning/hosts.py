"""Hosts that rank inside the language model: FastV, PDrop, SparseVLM, DART, and the baselines.

Each is a :class:`~pruning.host.Host` with a small scorer. Layer numbers are 0-indexed
decoder layers at whose *input* tokens are dropped; the attention a host ranks by is
the one of the layer just before (the last one that saw every token).
"""
from __future__ import annotations

import math
from functools import partial

import torch

from vlmtools.record import last_row

from .host import Host, SiteRows, at_present, lattice, merge_into


class _LastQuery(Host):
    """Ranks by the last prompt token's head-mean attention in the layer before each drop."""

    reads_previous_layer = True

    def scorers(self, run, vlm, plan):
        return [plan.attention(vlm.site(f"text.{layer - 1}"), SiteRows(last_row)) for layer in self.layers]

    def score(self, run, stage, hidden, kept, layout, targets):
        return run.scorers[stage].latest()[1][:, -1]


class FastV(_LastQuery):
    """FastV: at layer ``K`` rank by the last prompt token's head-mean attention in layer ``K - 1``.

    >>> with vlm.use(FastV(keep=64, layer=2, debias=True)):
    ...     out = model.generate(**inputs)
    """

    name = "fastv"

    def __init__(self, keep: int | float = 64, layer: int = 2, **kwargs):
        super().__init__(keep, (layer,), **kwargs)

    def options(self):
        return {"query": "last prompt token (paper and released code)", "heads": "mean",
                "K": f"{self.layers[0]} (paper: 2 for LLaVA-1.5-7B)"}


class PDrop(_LastQuery):
    """PyramidDrop: stages at ``layers`` (paper: after layers 8/16/24 of 32), each ranked by the
    last prompt token's attention in the layer just run, recomputed in fp32 from its q/k.

    The paper keeps half at each stage (576 -> 288 -> 144 -> 72); here ``keep`` is the final
    count and every stage keeps the same fraction ``(keep / N)^(1/stages)`` (0.5 at 576 -> 72).
    """

    name = "pdrop"

    def __init__(self, keep: int | float = 72, layers: tuple[int, ...] = (8, 16, 24), **kwargs):
        super().__init__(keep, tuple(layers), **kwargs)

    def options(self):
        return {"query": "last prompt token (the released code's last instruction token is the prompt's last)",
                "schedule": "equal fraction per stage (paper: lambda = 0.5)"}


class SparseVLM(Host):
    """SparseVLM: text "raters" (question tokens whose attention to the image is above the mean
    over the question) vote with their head-mean attention in the layer before each stage.

    Stages at ``layers`` (paper: 2/6/15 for 32 layers) with the geometric schedule of :class:`PDrop`.
    ``recycle > 0`` keeps ``ceil(merged * target)`` of the budget for merged tokens: the best-ranked
    tokens not kept as they are become group centres, and the top ``recycle`` fraction of those
    tokens joins the centre it is most similar to (hidden-state cosine; the mean of each group
    replaces its centre). Merged tokens count towards the budget, so token counts stay comparable.
    """

    name = "sparsevlm"
    reads_previous_layer = True

    def __init__(self, keep: int | float = 64, layers: tuple[int, ...] = (2, 6, 15), recycle: float = 0.0,
                 merged: float = 0.1, **kwargs):
        if not 0 <= recycle <= 1 or not 0 < merged < 1:
            raise ValueError("recycle must be in [0, 1] and merged in (0, 1)")
        super().__init__(keep, tuple(layers), **kwargs)
        self.recycle, self.merged = recycle, merged

    def scorers(self, run, vlm, plan):
        return [plan.attention(vlm.site(f"text.{layer - 1}"), SiteRows(partial(self.text_rows, run, layer - 1)))
                for layer in self.layers]

    @staticmethod
    def text_rows(run, layer: int, call) -> torch.Tensor:
        """Rows (indices into the tokens present in ``layer``) of any sample's question tokens."""
        present = run.present_at(layer, call.query.shape[0], call.q_len, call.query.device)
        rows = [torch.isin(present[b], sample.text.indices().to(present.device))
                for b, sample in enumerate(run.state.layout.samples)]
        return torch.stack(rows).any(0).nonzero().squeeze(1)

    def score(self, run, stage, hidden, kept, layout, targets):
        rows, probs = run.scorers[stage].latest()
        present = run.present_at(self.layers[stage] - 1, len(kept), probs.shape[-1], kept.device)
        out = []
        for b, sample in enumerate(layout.samples):
            mine = torch.isin(present[b][rows], sample.text.indices().to(kept.device))
            attention = probs[b, mine]  # (text rows, keys)
            visual = torch.isin(kept[b], sample.visual_positions().to(kept.device))
            relevance = attention[:, visual].sum(-1)
            raters = relevance > relevance.mean()
            out.append(attention[raters if raters.any() else slice(None)].mean(0))
        return torch.stack(out)

    def select(self, run, sample, scores, columns, hidden, target):
        if not self.recycle:
            return super().select(run, sample, scores, columns, hidden, target)
        order = columns[scores.argsort(descending=True, stable=True)]
        count = min(target - 1, math.ceil(self.merged * target)) if target > 1 else 0
        if not count:
            return order[:target], None
        dropped = order[target - count:]  # the tokens not kept as they are
        recycled = dropped[:max(count, math.ceil(self.recycle * len(dropped)))]
        centres, sources = recycled[:count], recycled[count:]
        merged = merge_into(hidden, centres, sources, hidden, mode="mean")
        return torch.cat([order[:target - count], centres]), torch.cat([hidden[order[:target - count]].float(),
                                                                         merged])

    def options(self):
        return {"raters": "question tokens with above-mean image attention (paper)", "heads": "mean",
                "schedule": "equal fraction per stage (paper: per-layer budgets)",
                "recycle": self.recycle, "merged": self.merged if self.recycle else None}


class DART(Host):
    """DART: no attention. Pivots are the tokens with the largest key norms in layer ``K - 1``
    (``pivots`` image and ``pivots`` text tokens); the image tokens kept at layer ``K`` are
    the pivots and those least similar (cosine of hidden states) to every pivot.

    The paper splits the budget among pivots, each keeping its least similar tokens; here one
    score ``1 - max cosine to any pivot`` ranks all (ours, simpler; close in effect).
    """

    name = "dart"
    attention_based = False
    reads_previous_layer = True

    def __init__(self, keep: int | float = 64, layer: int = 2, pivots: int = 4, **kwargs):
        super().__init__(keep, (layer,), **kwargs)
        self.pivots = pivots

    def scorers(self, run, vlm, plan):
        return [plan.attention(vlm.site(f"text.{self.layers[0] - 1}"), SiteRows(keys=True))]

    def score(self, run, stage, hidden, kept, layout, targets):
        norms = run.scorers[0].keys.float().pow(2).sum((1, 3)).sqrt()  # (B, n): heads concatenated
        normed = torch.nn.functional.normalize(hidden.float(), dim=-1)
        out = []
        for b, sample in enumerate(layout.samples):
            visual = torch.isin(kept[b], sample.visual_positions().to(kept.device))
            text = ~visual & ~torch.isin(kept[b], sample.padding.to(kept.device))
            pivots = torch.cat([_top(norms[b], visual, self.pivots), _top(norms[b], text, self.pivots)])
            score = 1 - (normed[b] @ normed[b, pivots].T).amax(-1)
            score[pivots] = 3.0  # above any 1 - cosine: pivots are kept
            out.append(score)
        return torch.stack(out)

    def options(self):
        return {"pivots": f"{self.pivots} image + {self.pivots} text by key norm (paper default 8 in total)",
                "similarity": "cosine of hidden states entering layer K", "ranking": "1 - max cosine (ours)"}


def _top(values: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    candidates = allowed.nonzero().squeeze(1)
    return candidates[values[candidates].argsort(descending=True)[:count]]


class RandomPrune(Host):
    """Baseline: keep a uniformly random subset of visual tokens (seeded, the same per call)."""

    name = "random"
    attention_based = False

    def __init__(self, keep: int | float = 64, layer: int = 2, seed: int = 0, **kwargs):
        super().__init__(keep, (layer,), **kwargs)
        self.seed = seed

    def score(self, run, stage, hidden, kept, layout, targets):
        generator = torch.Generator().manual_seed(self.seed)
        return torch.rand(kept.shape, generator=generator).to(kept.device)

    def options(self):
        return {"seed": self.seed}


class UniformGrid(Host):
    """Baseline: keep an evenly spaced 2-D lattice of each image's (and tile's) token grid."""

    name = "grid"
    attention_based = False

    def __init__(self, keep: int | float = 64, layer: int = 2, **kwargs):
        super().__init__(keep, (layer,), **kwargs)

    def score(self, run, stage, hidden, kept, layout, targets):
        values = []
        for sample, target in zip(layout.samples, targets):
            grids = [grid for image in sample.images for grid in (image.tiles or [image.grid])]
            values.append(lattice(grids, target))
        return at_present(values, layout, kept)
