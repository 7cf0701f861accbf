"""VAR's sink dimensions: the published table, discovery for other models, and the
question other methods ask ("which visual tokens are sinks at this prefill?")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from .base import Criterion, Evaluation, Finding, PerLayer, SinkTensors, by_layer

PUBLISHED_SINK_DIMS: dict[tuple, tuple[int, ...]] = {
    # (text model_type, hidden size, layers, MLP size): D
    ("llama", 4096, 32, 11008): (1415, 2533),  # LLaMA-2-7B, the LM of LLaVA-1.5-7B
    ("llama", 5120, 40, 13824): (2100, 4743),  # LLaMA-2-13B, the LM of LLaVA-1.5-13B
    ("qwen2_vl", 3584, 28, 18944): (458, 2570),  # Qwen2-VL-7B
}


def model_signature(config) -> tuple:
    """The key of :data:`PUBLISHED_SINK_DIMS` for a transformers config (VLM or LM)."""
    text = config.get_text_config()
    return (text.model_type.removesuffix("_text"), text.hidden_size, text.num_hidden_layers, text.intermediate_size)


def normalised(h: torch.Tensor) -> torch.Tensor:
    """``|h[..., d]| / rms(h)``: each dimension's magnitude relative to the token's RMS."""
    h = h.float()
    return h.abs() / h.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)


def discover_sink_dims(
    tensors: SinkTensors, layers: Sequence[int], tau: float = 20.0, consistency: float = 0.5
) -> tuple[int, ...]:
    """Dimensions where the first token's normalised magnitude (mean over samples)
    exceeds ``tau`` in at least ``consistency`` of ``layers``."""
    first = tensors.first()
    rows = torch.arange(tensors.batch)
    ratios = torch.stack([normalised(tensors.hidden[layer][rows, first]).mean(0).cpu() for layer in layers])
    extreme = (ratios > tau).float().mean(0) >= consistency
    return tuple(extreme.nonzero()[:, 0].tolist())


@dataclass
class SinkDimensions(Criterion):
    """VAR: ``phi(t) = max over d in D of |h[t, d]| / rms(h[t])``; a sink when ``phi > tau``,
    on the input of layers 2 .. L-1. ``dims=None`` takes D from the published table for
    this model, else discovers it; the report's settings say which and what D was."""

    name = "sink_dims"
    needs = "hidden"
    tau: float = 20.0
    dims: tuple[int, ...] | None = None
    consistency: float = 0.5
    layers: tuple[int, ...] | None = None

    def default_layers(self, num_layers: int) -> list[int]:
        return list(range(2, num_layers))

    def resolve_dims(self, tensors: SinkTensors) -> tuple[tuple[int, ...], str]:
        if self.dims is not None:
            return tuple(self.dims), "given"
        if tensors.signature in PUBLISHED_SINK_DIMS:
            return PUBLISHED_SINK_DIMS[tensors.signature], "published"
        layers = self.layer_range(tensors.num_layers)
        return discover_sink_dims(tensors, layers, self.tau, self.consistency), "discovered"

    def evaluate(self, tensors: SinkTensors) -> Evaluation:
        dims, source = self.resolve_dims(tensors)
        dense, findings, valid = tensors.dense(), [], tensors.valid()
        for layer in self.layer_range(tensors.num_layers):
            rms = tensors.norms(layer) / tensors.hidden[layer].shape[-1] ** 0.5
            ratios = (tensors.hidden[layer][..., list(dims)].float().abs() / rms[..., None].clamp(min=1e-12)).cpu()
            phi = ratios.amax(-1) if dims else torch.zeros(valid.shape)
            dense[:, layer] = phi.masked_fill(~valid, float("nan"))
            findings += [
                Finding(
                    self.name,
                    b,
                    t,
                    float(phi[b, t]),
                    layer=layer,
                    dims=tuple(d for d, r in zip(dims, ratios[b, t].tolist()) if r > self.tau),
                )
                for b, t in ((phi > self.tau) & valid).nonzero().tolist()
            ]
        return Evaluation(
            findings, dense, {"dims": list(dims), "dims_source": source, "signature": list(tensors.signature or ())}
        )


def visual_sink_positions(
    hidden: PerLayer,
    layout: TokenLayout,
    signature: tuple | None = None,
    num_layers: int | None = None,
    **settings,
) -> list[torch.Tensor]:
    """Visual tokens that are sink-dimension sinks in any of the layers, per sample.

    ``hidden[l]`` is the input of layer ``l`` (``RecordHidden``, or
    ``output_hidden_states[:-1]``); ``settings`` go to :class:`SinkDimensions`.

    >>> with vlm.use(vlmtools.RecordHidden()) as trace:
    ...     model(**inputs)
    >>> sinks = visual_sink_positions({l: trace[f"text.{l}.resid_pre"][0] for l in range(vlm.num_layers)}, layout)
    """
    hidden = by_layer(hidden)
    tensors = SinkTensors(layout, num_layers or max(hidden) + 1, hidden=hidden, signature=signature)
    tokens = {(f.sample, f.token) for f in SinkDimensions(**settings).evaluate(tensors).findings}
    return [
        torch.tensor(sorted(t for t in sample.visual_positions().tolist() if (b, t) in tokens), dtype=torch.long)
        for b, sample in enumerate(layout.samples)
    ]
