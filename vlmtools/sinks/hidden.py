"""Criteria read from the residual stream: massive activations and primary-cosine sinks.

They need no attention probabilities: the detector records hidden states with a layer
pre-hook and every attention call stays on the fused kernel. Each reads a layer in
one or two passes on the tensors' own device and moves only per-token results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Criterion, Evaluation, Finding, SinkTensors, median_over_tokens


@dataclass
class MassiveActivation(Criterion):
    """Sun et al.: ``|h[t, d]| > magnitude`` and ``> ratio x`` the median ``|h|`` of that
    layer (one sample's real tokens). Score: the token's largest ``|h|``."""

    name = "massive"
    needs = "hidden"
    magnitude: float = 100.0
    ratio: float = 1000.0
    layers: tuple[int, ...] | None = None

    def evaluate(self, tensors: SinkTensors) -> Evaluation:
        dense, findings, valid = tensors.dense(), [], tensors.valid()
        for layer in self.layer_range(tensors.num_layers):
            hidden = tensors.hidden[layer]
            low, high = torch.aminmax(hidden, dim=-1)
            peak = torch.maximum(high, -low).float().cpu().masked_fill(~valid, float("nan"))
            dense[:, layer] = peak
            for b in (peak > self.magnitude).any(-1).nonzero()[:, 0].tolist():
                # the median is only needed where something passes the magnitude test
                h = hidden[b].abs().float()
                floor = max(self.magnitude, self.ratio * float(h[valid[b].to(h.device)].median()))
                for t in (peak[b] > floor).nonzero()[:, 0].tolist():
                    findings.append(
                        Finding(
                            self.name,
                            b,
                            t,
                            float(peak[b, t]),
                            layer=layer,
                            dims=tuple((h[t] > floor).nonzero()[:, 0].tolist()),
                        )
                    )
        return Evaluation(findings, dense)


@dataclass
class PrimaryCosine(Criterion):
    """Secondary sinks (Wong et al.): in layers where the primary sink (each sample's
    first token) has a raised norm, token t is a sink when ``|cos(h_t, h_primary)| >
    threshold``; its lifetime (layers where it is) gives its class: ``primary`` (>=
    L - primary_margin layers), ``secondary`` (``short`` .. L - primary_margin - 1),
    ``short`` (fewer). "Raised" is ours: norm above ``norm_ratio`` x the median token norm.
    """

    name = "primary_cosine"
    needs = "hidden"
    threshold: float = 0.9
    norm_ratio: float = 2.0
    primary_margin: int = 15
    short: int = 5
    layers: tuple[int, ...] | None = None

    def evaluate(self, tensors: SinkTensors) -> Evaluation:
        dense, valid, first = tensors.dense(), tensors.valid(), tensors.first()
        rows = torch.arange(tensors.batch)
        fired = {}
        for layer in self.layer_range(tensors.num_layers):
            hidden = tensors.hidden[layer]
            norms = tensors.norms(layer).cpu()
            primary = hidden[rows, first].float()
            dots = torch.einsum("bld,bd->bl", hidden.float(), primary).cpu()
            cos = (dots / (norms * norms[rows, first][:, None]).clamp(min=1e-12)).abs()
            raised = norms[rows, first] > self.norm_ratio * median_over_tokens(norms, valid)[:, 0]
            dense[:, layer] = cos.masked_fill(~(valid & raised[:, None]), float("nan"))
            fired[layer] = (cos > self.threshold) & valid & raised[:, None]
        lifetime = sum(fired.values(), torch.zeros_like(valid, dtype=torch.long))
        findings = [
            Finding(
                self.name,
                b,
                t,
                float(dense[b, layer, t]),
                layer=layer,
                label=self.lifetime_class(int(lifetime[b, t]), tensors.num_layers),
            )
            for layer, hits in fired.items()
            for b, t in hits.nonzero().tolist()
        ]
        return Evaluation(findings, dense)

    def lifetime_class(self, lifetime: int, num_layers: int) -> str:
        if lifetime >= num_layers - self.primary_margin:
            return "primary"
        return "secondary" if lifetime >= self.short else "short"
