"""SinkDetector: choose criteria, record only what they need in one prefill, report."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..record import ColumnMass, RecordColumnMass, RecordHidden, RecordValueNorms
from .attention import ColumnMassSink, GlobalSink, Positional, ValueDrain
from .base import Criterion, SinkTensors, plain_layout, token_roles
from .dims import SinkDimensions, model_signature
from .hidden import MassiveActivation, PrimaryCosine
from .report import SinkReport

CRITERIA: dict[str, type[Criterion]] = {c.name: c for c in (
    Positional, ColumnMassSink, MassiveActivation, SinkDimensions, PrimaryCosine, ValueDrain, GlobalSink)}
DEFAULT = ("positional", "column_mass", "massive", "sink_dims", "primary_cosine", "value_drain")
HIDDEN = ("positional", "massive", "sink_dims", "primary_cosine")
"""Criteria that read no attention probabilities: every attention call stays fused."""

PerLayer = Mapping[int, torch.Tensor] | Sequence[torch.Tensor]
_TOKEN_AXIS = {"attn": -1, "hidden": 1, "values": 2, "joint": -1}


class SinkDetector:
    """Runs the chosen criteria on one prefill (``detect``) or on given tensors.

    >>> report = SinkDetector().detect(vlm, inputs)
    >>> print(report.table())
    >>> report = SinkDetector(["sink_dims"]).detect_tensors(hidden=out.hidden_states[:-1])
    """

    def __init__(self, criteria: Iterable[str | Criterion] = DEFAULT):
        self.criteria: list[Criterion] = []
        for criterion in criteria:
            if isinstance(criterion, str):
                if criterion not in CRITERIA:
                    raise ValueError(f"unknown sink criterion {criterion!r}; choose from {sorted(CRITERIA)}")
                criterion = CRITERIA[criterion]()
            self.criteria.append(criterion)
        names = [c.name for c in self.criteria]
        if len(set(names)) != len(names):
            raise ValueError(f"each criterion at most once (got {names}); run two detectors to compare settings")

    def layers(self, need: str, num_layers: int) -> list[int]:
        """Layers on which some chosen criterion reads ``need``."""
        chosen = (set(c.layer_range(num_layers)) for c in self.criteria if c.needs == need)
        return sorted(set().union(*chosen))

    def recorders(self, vlm) -> list:
        """The recorders ``detect`` attaches: only what the chosen criteria read."""
        if any(c.needs == "joint_attention" for c in self.criteria):
            raise ValueError("global_sink reads a DiT's joint attention: record it and call "
                             "detect_tensors(joint_attention=..., image_queries=...)")
        recorders = []
        if hidden := self.layers("hidden", vlm.num_layers):
            recorders.append(RecordHidden(hidden))
        if mass := self.layers("column_mass", vlm.num_layers):
            recorders.append(RecordColumnMass([f"text.{layer}" for layer in mass]))
        if values := self.layers("value_norms", vlm.num_layers):
            recorders.append(RecordValueNorms([f"text.{layer}" for layer in values]))
        return recorders

    def detect(self, vlm, inputs: dict[str, Any]) -> SinkReport:
        """One prefill of the wrapped model on ``inputs`` (a processor's output)."""
        with torch.no_grad(), vlm.use(*self.recorders(vlm)) as trace:
            vlm.model(**inputs)
        return self.evaluate(SinkTensors(
            layout=vlm.layout(inputs), num_layers=vlm.num_layers,
            hidden=_recorded(trace, "resid_pre"), column_mass=_recorded(trace, "column_mass"),
            value_norms=_recorded(trace, "value_norms"), signature=model_signature(vlm.model.config)))

    def detect_tensors(self, *, attn: PerLayer | None = None, hidden: PerLayer | None = None,
                       values: PerLayer | None = None, joint_attention: PerLayer | None = None,
                       image_queries: torch.Tensor | None = None, layout=None,
                       attention_mask: torch.Tensor | None = None, causal: bool = True,
                       num_layers: int | None = None, signature: tuple | None = None) -> SinkReport:
        """Criteria on tensors from any transformer, keyed (or listed) by layer.

        ``attn``: post-softmax ``(B, H, L, L)``; ``hidden``: inputs of the layers
        ``(B, L, D)`` (``output_hidden_states[:-1]``); ``values``: value norms
        ``(B, H, L)`` or vectors ``(B, H, L, Dh)``; ``joint_attention``: a DiT block's
        ``(B, H, Lq, Lk)`` or head-mean ``(B, Lq, Lk)``, with ``image_queries`` its image
        rows. Without a ``layout`` every token is text (padding from ``attention_mask``).
        """
        given = {name: _by_layer(x) for name, x in (("attn", attn), ("hidden", hidden), ("values", values),
                                                    ("joint", joint_attention)) if x is not None}
        if not given:
            raise ValueError("detect_tensors needs at least one of attn=, hidden=, values=, joint_attention=")
        kind, per_layer = next(iter(given.items()))
        some = next(iter(per_layer.values()))
        layout = layout or plain_layout(some.shape[0], some.shape[_TOKEN_AXIS[kind]], attention_mask)
        tensors = SinkTensors(layout=layout, signature=signature, image_queries=image_queries,
                              num_layers=num_layers or max(max(x) for x in given.values()) + 1,
                              hidden=given.get("hidden", {}))
        valid = tensors.valid()
        tensors.column_mass = {l: _column_mass(a, valid, causal) for l, a in given.get("attn", {}).items()}
        tensors.value_norms = {l: v.norm(dim=-1) if v.dim() == 4 else v for l, v in given.get("values", {}).items()}
        tensors.joint_attention = {l: a.mean(1) if a.dim() == 4 else a for l, a in given.get("joint", {}).items()}
        return self.evaluate(tensors)

    def evaluate(self, tensors: SinkTensors) -> SinkReport:
        """Every criterion on recorded tensors; roles from the layout."""
        tokens = [token_roles(sample) for sample in tensors.layout.samples]
        findings, scores, settings = [], {}, []
        for criterion in self.criteria:
            evaluation = criterion.evaluate(tensors)
            findings += [dataclasses.replace(f, **tokens[f.sample][f.token]) for f in evaluation.findings]
            if evaluation.scores is not None:
                scores[criterion.name] = evaluation.scores
            settings.append({**criterion.settings(), **evaluation.derived})
        grids = [[image.grid for image in sample.images] for sample in tensors.layout.samples]
        return SinkReport(findings, scores, tokens, grids, settings, tensors.num_layers)


def _recorded(trace, what: str) -> dict[int, Any]:
    """``{layer: record}`` of the one forward from trace keys ``text.{layer}.{what}``."""
    return {int(key.split(".")[1]): records[0] for key, records in trace.items()
            if key.startswith("text.") and key.endswith(f".{what}")}


def _by_layer(tensors: PerLayer) -> dict[int, torch.Tensor]:
    return dict(tensors) if isinstance(tensors, Mapping) else dict(enumerate(tensors))


def _column_mass(probs: torch.Tensor, valid: torch.Tensor, causal: bool) -> ColumnMass:
    """Column mass of full attention: each key's total over the real queries that see it."""
    seq_len = probs.shape[-1]
    visible = valid[:, None, :, None] & valid[:, None, None, :]
    if causal:
        visible = visible & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    visible = visible.to(probs.device)
    return ColumnMass(total=(probs.float() * visible).sum(2), queries=visible.float().sum(2))
