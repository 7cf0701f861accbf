"""Global sinks in a DiT's joint attention (RefAM), read without holding any L x L map.

A :class:`RecordJointColumns` hook sums, per key, the head-mean attention over all
queries and its first two moments over the image queries, chunk by chunk: that is
all the criterion needs (mean received attention and the coefficient of variation
of the key's map over the image), in ``O(L)`` memory per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import DiTLayout, SampleLayout, TokenLayout
from ..plan import ALL
from ..record import SiteRecorder
from .base import Criterion, Evaluation, Finding, SinkTensors, median_over_tokens


@dataclass
class JointColumns:
    """Per key ``(B, Lk)``: head-mean attention summed over all queries, and its sum and
    sum of squares over the image queries."""

    total: torch.Tensor
    image_sum: torch.Tensor
    image_squares: torch.Tensor
    queries: int = 0
    image_queries: int = 0

    @classmethod
    def zeros(cls, batch: int, keys: int, device=None) -> JointColumns:
        return cls(*(torch.zeros(batch, keys, device=device) for _ in range(3)))

    @classmethod
    def of(cls, attn: torch.Tensor, image_queries: torch.Tensor) -> JointColumns:
        """From a full ``(B, H, Lq, Lk)`` or head-mean ``(B, Lq, Lk)`` attention."""
        attn = attn.float().mean(1) if attn.dim() == 4 else attn.float()
        columns = cls.zeros(attn.shape[0], attn.shape[-1], attn.device)
        columns.add(torch.arange(attn.shape[1], device=attn.device), attn, image_queries)
        return columns

    def add(self, rows: torch.Tensor, attn: torch.Tensor, image_queries: torch.Tensor) -> None:
        """Accumulate head-mean rows ``attn (B, len(rows), Lk)``."""
        image = attn[:, torch.isin(rows, image_queries.to(rows.device))]
        self.total += attn.sum(1)
        self.image_sum += image.sum(1)
        self.image_squares += image.pow(2).sum(1)
        self.queries += attn.shape[1]
        self.image_queries += image.shape[1]

    def received(self) -> torch.Tensor:
        """Mean attention each key receives over all queries."""
        return self.total / max(self.queries, 1)

    def image_cv(self) -> torch.Tensor:
        """Coefficient of variation (population) of each key's map over the image queries."""
        mean = self.image_sum / max(self.image_queries, 1)
        variance = (self.image_squares / max(self.image_queries, 1) - mean.pow(2)).clamp(min=0)
        return variance.sqrt() / mean.clamp(min=1e-12)


class RecordJointColumns(SiteRecorder):
    """Fills ``trace["{site}.joint_columns"]`` with one :class:`JointColumns` per call."""

    what = "joint_columns"

    def __init__(self, sites: list[str], image_queries: torch.Tensor):
        super().__init__(sites)
        self.image_queries = image_queries

    def rows(self, block, call):
        return ALL

    def observe(self, block, call):
        block.entries(call).append(JointColumns.zeros(call.query.shape[0], call.k_len, call.query.device))

    def record(self, block, call, rows, probs):
        block.entries(call)[-1].add(rows, probs.mean(1), self.image_queries)


def joint_token_layout(layout: DiTLayout, batch: int) -> TokenLayout:
    """A DiT's joint sequence as a :class:`TokenLayout` (one image, no padding) for roles."""
    empty = torch.empty(0, dtype=torch.long)
    length = len(layout.text) + len(layout.image)
    sample = SampleLayout(length=length, images=[layout.image], text=layout.text, padding=empty, layout=empty, first=0)
    return TokenLayout(samples=[sample] * batch, seq_len=length, generated_from=length)


@dataclass
class GlobalSink(Criterion):
    """A DiT key that every query attends to, a lot and evenly (RefAM's global sinks).

    Ours (the paper gives no formula): mean received attention over all queries above
    ``ratio`` times the median over keys, and coefficient of variation of its map over
    the image queries below ``max_cv``. Score: the ratio; label: the CV.
    """

    name = "global_sink"
    needs = "joint_columns"
    ratio: float = 5.0
    max_cv: float = 0.5
    layers: tuple[int, ...] | None = None

    def evaluate(self, tensors: SinkTensors) -> Evaluation:
        dense, findings, valid = tensors.dense(), [], tensors.valid()
        for layer in self.layer_range(tensors.num_layers):
            columns = tensors.joint_columns[layer]
            received, cv = columns.received().cpu(), columns.image_cv().cpu()
            ratio = received / median_over_tokens(received, valid).clamp(min=1e-12)
            fired = (ratio > self.ratio) & (cv < self.max_cv) & valid
            dense[:, layer] = ratio.masked_fill(~valid, float("nan"))
            findings += [
                Finding(self.name, b, k, float(ratio[b, k]), layer=layer, label=f"cv {cv[b, k]:.2f}")
                for b, k in fired.nonzero().tolist()
            ]
        return Evaluation(findings, dense)
