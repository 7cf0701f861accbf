"""VAR's sink dimensions: the published table, discovery for other models (one set per
model, found once over the middle layers and cached with the model's calibration), and
the question other methods ask ("which visual tokens are sinks at this prefill?")."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..cache import cache_dir, write_json
from ..layout import TokenLayout
from ..plan import ACTIVE_PLAN
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


def extreme_dims(ratios: torch.Tensor, tau: float, consistency: float) -> tuple[int, ...]:
    """The rule of discovery: ``ratios`` ``(layers, D)`` holds the first token's normalised
    magnitude per layer; D is the dimensions above ``tau`` in at least ``consistency`` of them."""
    extreme = (ratios > tau).float().mean(0) >= consistency
    return tuple(extreme.nonzero()[:, 0].tolist())


def discover_sink_dims(
    tensors: SinkTensors, layers: Sequence[int], tau: float = 20.0, consistency: float = 0.5
) -> tuple[int, ...]:
    """Dimensions where the first token's normalised magnitude (mean over samples)
    exceeds ``tau`` in at least ``consistency`` of ``layers``."""
    first = tensors.first()
    rows = torch.arange(tensors.batch)
    ratios = torch.stack([normalised(tensors.hidden[layer][rows, first]).mean(0).cpu() for layer in layers])
    return extreme_dims(ratios, tau, consistency)


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


@dataclass
class ModelSinkDims:
    """One model's sink dimensions D, found once over its middle layers (VAR's discovery).

    ``dims``: the dimensions where the first token's ``|h_d| / rms(h)`` exceeds ``tau`` in at
    least ``consistency`` of ``layers`` (the sink-dimension criterion's layers, 2 .. L-1);
    empty when none does. ``strongest``: the first token's five largest dimensions as
    ``[dim, median ratio over layers]`` (what an empty discovery came closest to);
    ``first_tokens``: the token ids it ran on. ``source``: ``"discovered"`` (just now) or
    ``"cached"`` (read from ``path``).
    """

    model: str
    signature: list
    dims: list[int]
    tau: float
    consistency: float
    layers: list[int]
    first_tokens: list[int]
    strongest: list[list[float]] = field(default_factory=list)
    source: str = "discovered"
    path: str | None = None

    def save(self, path: str | Path) -> Path:
        """Write the JSON (atomically: a reader never sees half a file)."""
        return write_json(path, {k: v for k, v in asdict(self).items() if k not in ("source", "path")})

    @classmethod
    def load(cls, path: str | Path) -> ModelSinkDims:
        return cls(**json.loads(Path(path).read_text()), source="cached", path=str(path))


def model_name(vlm) -> str | None:
    """The checkpoint folder's name (``config._name_or_path``), None for a model built in memory."""
    return Path(str(getattr(vlm.model.config, "_name_or_path", "") or "")).name or None


def sink_dims_path(vlm, tau: float = 20.0, directory: str | Path | None = None) -> Path | None:
    """``<directory>/<model>__sink_dims__tau<tau>.json``; ``directory`` defaults to ``calibration/`` in
    the cache (``$VLMTOOLS_CACHE`` or ``~/.cache/vlmtools``), where pruning keeps its trends. None for an
    unnamed model (one built in memory): its discovery is never cached, as two such models may differ."""
    name = model_name(vlm)
    if name is None:
        return None
    return Path(directory or cache_dir() / "calibration") / f"{name}__sink_dims__tau{tau:g}.json"


def first_token_states(vlm, token_ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream entering each LM layer for the one-token sequences ``token_ids`` ``(B,)``:
    one ``(B, D)`` tensor per layer.

    Attention is causal, so a prompt's first token has exactly these states whatever follows it:
    the discovery reads the first token of any prompt for one token's compute. Runs outside any
    plan (no hook of the enclosing block sees it), without a cache.
    """
    lm = vlm.model.get_submodule(vlm.adapter.text_layers.rsplit(".", 1)[0])
    device = next(lm.parameters()).device
    token = ACTIVE_PLAN.set(None)
    try:
        with torch.no_grad():
            out = lm(input_ids=token_ids.reshape(-1, 1).to(device), use_cache=False, output_hidden_states=True)
    finally:
        ACTIVE_PLAN.reset(token)
    return [h[:, 0] for h in out.hidden_states[: vlm.num_layers]]


def discovery_layers(num_layers: int, layers: Sequence[int] | None = None) -> list[int]:
    """The layers discovery reads: ``layers``, else the middle layers 2 .. L-1 (all of a shallower model)."""
    chosen = list(layers) if layers is not None else SinkDimensions().default_layers(num_layers)
    return chosen or list(range(num_layers))


def discover_model_sink_dims(
    vlm, token_ids: torch.Tensor, tau: float = 20.0, consistency: float = 0.5, layers: Sequence[int] | None = None
) -> ModelSinkDims:
    """D of a model outside :data:`PUBLISHED_SINK_DIMS`: the detector's discovery rule
    (:func:`extreme_dims`) on the first token's states in ``layers`` (default: the middle
    layers 2 .. L-1), averaged over the distinct ``token_ids`` (the prompts' first tokens)."""
    ids = torch.unique(torch.as_tensor(token_ids).flatten().cpu())
    layers = discovery_layers(vlm.num_layers, layers)
    states = first_token_states(vlm, ids)
    ratios = torch.stack([normalised(states[layer]).mean(0).cpu() for layer in layers])
    median = ratios.median(0).values
    top = median.topk(min(5, median.numel()))
    return ModelSinkDims(
        model=model_name(vlm) or f"{vlm.family} (in memory)",
        signature=list(model_signature(vlm.model.config)),
        dims=list(extreme_dims(ratios, tau, consistency)),
        tau=tau,
        consistency=consistency,
        layers=layers,
        first_tokens=ids.tolist(),
        strongest=[[int(d), round(float(v), 3)] for v, d in zip(top.values, top.indices)],
    )


def model_sink_dims(
    vlm,
    token_ids: torch.Tensor | None = None,
    tau: float = 20.0,
    consistency: float = 0.5,
    layers: Sequence[int] | None = None,
    directory: str | Path | None = None,
    refresh: bool = False,
) -> ModelSinkDims | None:
    """The model's sink dimensions: read from its calibration file (:func:`sink_dims_path`) when
    one matches (same model signature, ``consistency`` and layers), else discovered on the first
    tokens ``token_ids`` and saved there (``refresh=True`` always rediscovers). None when nothing
    is cached and no ``token_ids`` are given.

    >>> found = model_sink_dims(vlm, inputs["input_ids"][:, :1])   # once, before any run
    >>> found.dims, found.path
    """
    path = sink_dims_path(vlm, tau, directory)
    if path is not None and path.exists() and not refresh:
        cached = ModelSinkDims.load(path)
        wanted = (list(model_signature(vlm.model.config)), consistency, discovery_layers(vlm.num_layers, layers))
        if (cached.signature, cached.consistency, cached.layers) == wanted:
            return cached
    if token_ids is None:
        return None
    found = discover_model_sink_dims(vlm, token_ids, tau, consistency, layers)
    if path is not None:
        found.save(path)
        found.path = str(path)
    return found


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
