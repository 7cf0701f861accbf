"""Criteria read from attention in a VLM's language model: position, column mass, value drain."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Criterion, Evaluation, Finding, SinkTensors, median_over_tokens


@dataclass
class Positional(Criterion):
    """StreamingLLM: the first ``k`` real tokens of every sample."""

    name = "positional"
    k: int = 4

    def evaluate(self, tensors: SinkTensors) -> Evaluation:
        valid = tensors.valid()
        return Evaluation(
            [
                Finding(self.name, b, token, 1.0)
                for b in range(tensors.batch)
                for token in valid[b].nonzero()[: self.k, 0].tolist()
            ]
        )


@dataclass
class ColumnMassSink(Criterion):
    """Key k is a sink in (layer, head) when its mean attention over the queries that
    see it exceeds ``eps``; the dense map is the share of heads where it is.

    Keys near the end are seen by few queries, so one query's attention decides their
    mean: ``min_queries`` (1 = the published definition) can demand more.
    """

    name = "column_mass"
    needs = "column_mass"
    eps: float = 0.3
    min_queries: int = 1
    layers: tuple[int, ...] | None = None

    def evaluate(self, tensors: SinkTensors) -> Evaluation:
        dense, findings, valid = tensors.dense(), [], tensors.valid()
        for layer in self.layers_in(tensors):
            mass = tensors.column_mass[layer]
            alpha = mass.mean.float().cpu()
            seen = (mass.queries.cpu() >= self.min_queries) & valid[:, None]
            fired = (alpha > self.eps) & seen
            dense[:, layer] = fired.float().mean(1).masked_fill(~valid, float("nan"))
            findings += [
                Finding(self.name, b, k, float(alpha[b, h, k]), layer=layer, head=h)
                for b, h, k in fired.nonzero().tolist()
            ]
        return Evaluation(findings, dense)


@dataclass
class ValueDrain(Criterion):
    """Active-dormant heads: a token whose value norm in (layer, head) is below ``ratio``
    times that head's median value norm; the finding's score is the ratio."""

    name = "value_drain"
    needs = "value_norms"
    ratio: float = 0.1
    layers: tuple[int, ...] | None = None

    def evaluate(self, tensors: SinkTensors) -> Evaluation:
        dense, findings, valid = tensors.dense(), [], tensors.valid()
        for layer in self.layers_in(tensors):
            norms = tensors.value_norms[layer].float().cpu()
            ratio = norms / median_over_tokens(norms, valid).clamp(min=1e-12)
            fired = (ratio < self.ratio) & valid[:, None]
            dense[:, layer] = fired.float().mean(1).masked_fill(~valid, float("nan"))
            findings += [
                Finding(self.name, b, k, float(ratio[b, h, k]), layer=layer, head=h)
                for b, h, k in fired.nonzero().tolist()
            ]
        return Evaluation(findings, dense)
