"""SinkDetector: choose criteria, record only what they need in one forward, report."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from ..layout import DiTLayout, TokenLayout
from ..record import ColumnMass, RecordColumnMass, RecordHidden, RecordValueNorms
from .attention import ColumnMassSink, Positional, ValueDrain
from .base import Criterion, PerLayer, SinkTensors, by_layer, plain_layout, token_roles
from .dims import SinkDimensions, model_signature
from .dit import GlobalSink, JointColumns, RecordJointColumns, joint_token_layout
from .hidden import MassiveActivation, PrimaryCosine
from .report import SinkReport

CRITERIA: dict[str, type[Criterion]] = {
    c.name: c
    for c in (Positional, ColumnMassSink, MassiveActivation, SinkDimensions, PrimaryCosine, ValueDrain, GlobalSink)
}
DEFAULT = ("positional", "column_mass", "massive", "sink_dims", "primary_cosine", "value_drain")
"""Every criterion that applies to a VLM's language model."""
HIDDEN = ("positional", "massive", "sink_dims", "primary_cosine")
"""Criteria that read no attention probabilities: every attention call stays fused."""

_TOKEN_AXIS = {"attn": -1, "hidden": 1, "values": 2, "joint": -1}


class SinkDetector:
    """Runs the chosen criteria on one forward (``detect``) or on given tensors.

    >>> report = SinkDetector().detect(vlm, inputs)        # a wrapped VLM and a processor's batch
    >>> report = SinkDetector(["global_sink"]).detect(dit, transformer_kwargs)
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

    def layers(self, need: str, num_layers: int, attention_layers: list[int] | None = None) -> list[int]:
        """Layers on which some chosen criterion reads ``need`` (attention only where there is some)."""
        chosen = (set(c.read_layers(num_layers, attention_layers)) for c in self.criteria if c.needs == need)
        return sorted(set().union(*chosen))

    def recorders(self, vlm, layout: DiTLayout | None = None) -> list:
        """The recorders ``detect`` attaches: only what the chosen criteria read."""
        dit = vlm.adapter.kind == "dit"
        wrong = [c.name for c in self.criteria if c.needs is not None and (c.needs == "joint_columns") != dit]
        if wrong:
            where = "a DiT's joint attention" if dit else "a VLM's language model"
            raise ValueError(
                f"criteria {wrong} do not read {where}: use global_sink on a DiT, the others on a VLM "
                "(or detect_tensors on tensors you recorded)"
            )
        if dit:
            blocks = self.layers("joint_columns", len(vlm.sites))
            return [RecordJointColumns([vlm.sites[i].name for i in blocks], layout.image.positions)] if blocks else []
        recorders, attention = [], vlm.attention_layers
        if hidden := self.layers("hidden", vlm.num_layers):
            recorders.append(RecordHidden(hidden))
        if mass := self.layers("column_mass", vlm.num_layers, attention):
            recorders.append(RecordColumnMass([f"text.{layer}" for layer in mass]))
        if values := self.layers("value_norms", vlm.num_layers, attention):
            recorders.append(RecordValueNorms([f"text.{layer}" for layer in values]))
        return recorders

    def detect(self, vlm, inputs: dict[str, Any]) -> SinkReport:
        """One forward of the wrapped model on ``inputs``: a VLM's prefill (a processor's
        batch) or one call of a DiT (the transformer's keyword arguments)."""
        dit = vlm.adapter.kind == "dit"
        layout = vlm.layout(*vlm.adapter.sizes(vlm.model, inputs)) if dit else vlm.layout(inputs)
        with torch.no_grad(), vlm.use(*self.recorders(vlm, layout)) as trace:
            vlm.model(**inputs)
        if dit:
            names = [site.name for site in vlm.sites]
            frames = vlm.adapter.frames(vlm.model, inputs) if vlm.adapter.frames else 1
            return self.evaluate(
                SinkTensors(
                    layout=joint_token_layout(layout, inputs["hidden_states"].shape[0], frames),
                    num_layers=len(names),
                    joint_columns=_recorded(trace, names, "joint_columns"),
                    layer_names=names,
                )
            )
        names = [f"text.{layer}" for layer in range(vlm.num_layers)]
        return self.evaluate(
            SinkTensors(
                layout=layout,
                num_layers=vlm.num_layers,
                hidden=_recorded(trace, names, "resid_pre"),
                column_mass=_recorded(trace, names, "column_mass"),
                value_norms=_recorded(trace, names, "value_norms"),
                layer_names=names,
                signature=model_signature(vlm.model.config),
                attention_layers=vlm.attention_layers,
                gated_layers=vlm.gated_layers,
            )
        )

    def detect_tensors(
        self,
        *,
        attn: PerLayer | None = None,
        hidden: PerLayer | None = None,
        values: PerLayer | None = None,
        joint_attention: PerLayer | None = None,
        image_queries: torch.Tensor | None = None,
        layout: TokenLayout | DiTLayout | None = None,
        attention_mask: torch.Tensor | None = None,
        causal: bool = True,
        num_layers: int | None = None,
        signature: tuple | None = None,
    ) -> SinkReport:
        """Criteria on tensors from any transformer, keyed (or listed) by layer.

        ``attn``: post-softmax ``(B, H, L, L)``; ``hidden``: inputs of the layers
        ``(B, L, D)`` (``output_hidden_states[:-1]``); ``values``: value norms
        ``(B, H, L)`` or vectors ``(B, H, L, Dh)``; ``joint_attention``: a DiT block's
        ``(B, H, Lq, Lk)`` or head-mean ``(B, Lq, Lk)`` with ``image_queries`` its image
        rows (or a ``DiTLayout``). Without a ``layout`` every token is text (padding
        from ``attention_mask``).
        """
        given = {
            name: by_layer(x)
            for name, x in (("attn", attn), ("hidden", hidden), ("values", values), ("joint", joint_attention))
            if x is not None
        }
        if not given:
            raise ValueError("detect_tensors needs at least one of attn=, hidden=, values=, joint_attention=")
        kind, per_layer = next(iter(given.items()))
        some = next(iter(per_layer.values()))
        if isinstance(layout, DiTLayout):
            image_queries = layout.image.positions if image_queries is None else image_queries
            layout = joint_token_layout(layout, some.shape[0])
        if "joint" in given and image_queries is None:
            raise ValueError("global sinks need the image-query rows: pass image_queries= or a DiTLayout")
        tensors = SinkTensors(
            layout=layout or plain_layout(some.shape[0], some.shape[_TOKEN_AXIS[kind]], attention_mask),
            num_layers=num_layers or max(max(x) for x in given.values()) + 1,
            hidden=given.get("hidden", {}),
            signature=signature,
        )
        valid = tensors.valid()
        tensors.column_mass = {l: _column_mass(a, valid, causal) for l, a in given.get("attn", {}).items()}
        tensors.value_norms = {l: v.norm(dim=-1) if v.dim() == 4 else v for l, v in given.get("values", {}).items()}
        tensors.joint_columns = {l: JointColumns.of(a, image_queries) for l, a in given.get("joint", {}).items()}
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
            read = {"read_layers": criterion.layers_in(tensors)} if criterion.needs is not None else {}
            settings.append({**criterion.settings(), **evaluation.derived, **read})
        grids = [[image.grid for image in sample.images] for sample in tensors.layout.samples]
        names = tensors.layer_names or [f"layer.{layer}" for layer in range(tensors.num_layers)]
        return SinkReport(findings, scores, tokens, grids, settings, names, _layers(tensors))


def _layers(tensors: SinkTensors) -> dict:
    """What the report says of the model's layers: which have attention, which have none, which are gated."""
    attention = list(range(tensors.num_layers)) if tensors.attention_layers is None else list(tensors.attention_layers)
    linear = [layer for layer in range(tensors.num_layers) if layer not in attention]
    if not linear and not tensors.gated_layers:
        return {}  # every layer plain softmax attention: nothing to say
    return {"attention": attention, "linear": linear, "gated": list(tensors.gated_layers)}


def _recorded(trace, names: list[str], what: str) -> dict[int, Any]:
    """``{layer: record}`` of the one forward, for the layers whose ``{name}.{what}`` was recorded."""
    return {index: trace[f"{name}.{what}"][0] for index, name in enumerate(names) if f"{name}.{what}" in trace}


def _column_mass(probs: torch.Tensor, valid: torch.Tensor, causal: bool) -> ColumnMass:
    """Column mass of full attention: each key's total over the real queries that see it."""
    seq_len = probs.shape[-1]
    visible = valid[:, None, :, None] & valid[:, None, None, :]
    if causal:
        visible = visible & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    visible = visible.to(probs.device)
    return ColumnMass(total=(probs.float() * visible).sum(2), queries=visible.float().sum(2))
