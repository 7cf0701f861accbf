"""Global sinks in a DiT's joint attention (RefAM), read without holding any L x L map.

A :class:`RecordJointColumns` hook sums, per key, the head-mean attention over all
queries and its first two moments over the image queries, chunk by chunk: that is
all the criterion needs (mean received attention and the coefficient of variation
of the key's map over the image), in ``O(L)`` memory per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import DiTLayout, ImageTokens, SampleLayout, Span, TokenLayout
from ..plan import ALL
from ..record import SiteRecorder
from .base import Criterion, Evaluation, Finding, SinkTensors, median_over_tokens


@dataclass
class JointColumns:
    """Per key of the joint sequence ``(B, L)``: head-mean attention summed over the queries, and its
    sum and sum of squares over the image queries; ``present`` marks the keys this site's call had
    (a cross-attention's keys are only the text, a video self-attention's only the video) and that
    some query could see (a masked pad is absent); ``queries`` / ``image_queries`` count each
    sample's queries (a padded text token that sees nothing is no query)."""

    total: torch.Tensor
    image_sum: torch.Tensor
    image_squares: torch.Tensor
    present: torch.Tensor | None = None
    queries: torch.Tensor | int = 0
    image_queries: torch.Tensor | int = 0

    @classmethod
    def zeros(cls, batch: int, keys: int, device=None) -> JointColumns:
        columns = cls(*(torch.zeros(batch, keys, device=device) for _ in range(3)))
        columns.present = torch.ones(batch, keys, dtype=torch.bool, device=device)
        columns.queries = torch.zeros(batch, device=device)
        columns.image_queries = torch.zeros(batch, device=device)
        return columns

    @classmethod
    def of(cls, attn: torch.Tensor, image_queries: torch.Tensor) -> JointColumns:
        """From a full ``(B, H, Lq, Lk)`` or head-mean ``(B, Lq, Lk)`` attention."""
        attn = attn.float().mean(1) if attn.dim() == 4 else attn.float()
        columns = cls.zeros(attn.shape[0], attn.shape[-1], attn.device)
        columns.add(torch.arange(attn.shape[1], device=attn.device), attn, image_queries)
        return columns

    def add(self, rows: torch.Tensor, attn: torch.Tensor, image_queries: torch.Tensor, offset: int = 0,
            weight: torch.Tensor | None = None) -> None:
        """Accumulate head-mean rows ``attn (B, len(rows), Lk)`` whose key ``k`` is position ``offset + k``;
        ``weight (B, len(rows))`` counts each row (1: a query, 0: none)."""
        weight = attn.new_ones(attn.shape[:2]) if weight is None else weight.to(attn)
        keys = slice(offset, offset + attn.shape[-1])
        image = torch.isin(rows, image_queries.to(rows.device)).to(attn) * weight
        self.total[:, keys] += torch.einsum("bq,bqk->bk", weight, attn)
        self.image_sum[:, keys] += torch.einsum("bq,bqk->bk", image, attn)
        self.image_squares[:, keys] += torch.einsum("bq,bqk->bk", image, attn.pow(2))
        self.queries = self.queries + weight.sum(1)
        self.image_queries = self.image_queries + image.sum(1)

    def _count(self, n) -> torch.Tensor:
        n = n if torch.is_tensor(n) else torch.tensor(float(n))
        return n.to(self.total).clamp(min=1).reshape(-1, 1)

    def received(self) -> torch.Tensor:
        """Mean attention each key receives over all queries."""
        return self.total / self._count(self.queries)

    def image_cv(self) -> torch.Tensor:
        """Coefficient of variation (population) of each key's map over the image queries."""
        count = self._count(self.image_queries)
        mean = self.image_sum / count
        variance = (self.image_squares / count - mean.pow(2)).clamp(min=0)
        return variance.sqrt() / mean.clamp(min=1e-12)


class RecordJointColumns(SiteRecorder):
    """Fills ``trace["{site}.joint_columns"]`` with one :class:`JointColumns` per call, over the
    joint sequence of the call's layout (text and image; Wan: its virtual ``[video, text]``)."""

    what = "joint_columns"

    def __init__(self, sites: list[str], image_queries: torch.Tensor):
        super().__init__(sites)
        self.image_queries = image_queries

    def rows(self, block, call):
        return ALL

    def observe(self, block, call):
        layout, batch = block.state.layout, call.query.shape[0]
        offset = _key_offset(call, layout)
        columns = JointColumns.zeros(batch, len(layout.text) + len(layout.image), call.query.device)
        columns.present[:] = False
        columns.present[:, offset:offset + call.k_len] = _keys_seen(call)
        block.entries(call).append(columns)

    def record(self, block, call, rows, probs):
        columns = block.entries(call)[-1]
        weight = None
        if call.q_len == call.k_len and getattr(call.site, "keys", "joint") == "joint":
            # a joint sequence: a token no query may see as a key (a masked pad) is no query either
            weight = _keys_seen(call)[:, rows.to(call.query.device)]
        columns.add(rows, probs.mean(1), self.image_queries, _key_offset(call, block.state.layout), weight)


def _key_offset(call, layout) -> int:
    """Layout position of the call's key 0 (a cross-attention's keys are the text: see ``DiTSite``)."""
    offset = getattr(call.site, "key_offset", None)
    return offset(layout) if offset is not None else 0


def _keys_seen(call) -> torch.Tensor:
    """``(B, Lk)``: keys that some query may attend to, from a key mask ``(B|1, 1, 1, Lk)`` (no ``L x L`` map)."""
    batch = call.query.shape[0]
    visible = call.visible
    if visible is None:
        return torch.ones(batch, call.k_len, dtype=torch.bool, device=call.query.device)
    if visible.shape[-2] != 1:
        visible = visible.any(-2, keepdim=True)
    return visible.any(1)[:, 0].expand(batch, -1).to(call.query.device)


def joint_token_layout(layout: DiTLayout, batch: int, frames: int = 1) -> TokenLayout:
    """A DiT's joint sequence as a :class:`TokenLayout` (no padding) for roles: one image, or a video DiT's
    ``frames`` latent frames (stacked in the layout's grid) as one image each, ``frame=(0, f)``."""
    empty = torch.empty(0, dtype=torch.long)
    length = len(layout.text) + len(layout.image)
    images = [layout.image]
    if frames > 1:
        rows, cols = layout.image.grid[0] // frames, layout.image.grid[1]
        images = [ImageTokens(positions=part, grid=(rows, cols), span=Span(int(part[0]), int(part[-1]) + 1),
                              frame=(0, f)) for f, part in enumerate(layout.image.positions.split(rows * cols))]
    sample = SampleLayout(length=length, images=images, text=layout.text, padding=empty, layout=empty, first=0)
    return TokenLayout(samples=[sample] * batch, seq_len=length, generated_from=length)


@dataclass
class GlobalSink(Criterion):
    """A DiT key that every query attends to, a lot and evenly (RefAM's global sinks).

    Ours (the paper gives no formula): mean received attention over all queries above
    ``ratio`` times the median over keys, and coefficient of variation of its map over
    the image queries below ``max_cv``. Score: the ratio; label: the CV. The keys are those
    the layer's call had (:attr:`JointColumns.present`): on Wan's cross-attention the text
    keys, the median taken over them; on its self-attention the video keys.
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
            keys = valid if columns.present is None else valid & columns.present.cpu()
            ratio = received / median_over_tokens(received, keys).clamp(min=1e-12)
            fired = (ratio > self.ratio) & (cv < self.max_cv) & keys
            dense[:, layer] = ratio.masked_fill(~keys, float("nan"))
            findings += [
                Finding(self.name, b, k, float(ratio[b, k]), layer=layer, label=f"cv {cv[b, k]:.2f}")
                for b, k in fired.nonzero().tolist()
            ]
        return Evaluation(findings, dense)
