"""What every sink criterion shares: the tensors it reads, what it reports, its interface.

A criterion is a small dataclass with one job: ``needs`` names the one kind of
tensor it reads (or None), ``layers`` the layers it reads it on, and
``evaluate`` turns :class:`SinkTensors` into an :class:`Evaluation`. Tokens are
addressed by sequence position, never by token id (Qwen2 tokenizers add no BOS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from ..layout import SampleLayout, Span, TokenLayout
from ..record import ColumnMass

if TYPE_CHECKING:
    from .dit import JointColumns

PerLayer = Mapping[int, torch.Tensor] | Sequence[torch.Tensor]
Need = Literal["hidden", "column_mass", "value_norms", "joint_columns"]
ATTENTION_NEEDS = ("column_mass", "value_norms")
"""What only a layer with softmax attention has (a hybrid family's linear layers have neither)."""


@dataclass(frozen=True)
class Finding:
    """One token that one criterion calls a sink, in one layer (and head where it applies).

    ``score`` is the criterion's own quantity (column mean, |h|, phi, |cos|, value-norm
    ratio, mass ratio); ``dims`` the hidden dimensions that fired; ``label`` a class
    (sink lifetime) or a note. The role fields come from the layout: ``role`` is one of
    first / visual / text / padding / layout, and visual tokens carry their image and
    grid cell, and for a video frame its ``frame`` (index in its video: a video DiT's
    latent frame, a VLM's sampled frame).
    """

    criterion: str
    sample: int
    token: int
    score: float
    layer: int | None = None
    head: int | None = None
    dims: tuple[int, ...] = ()
    label: str = ""
    role: str = ""
    image: int | None = None
    row: int | None = None
    col: int | None = None
    frame: int | None = None


@dataclass
class Evaluation:
    """A criterion's findings, its dense ``(B, layers, L)`` score map (NaN where not
    evaluated; None when it has no layers) and settings it derived (discovered dims)."""

    findings: list[Finding]
    scores: torch.Tensor | None = None
    derived: dict = field(default_factory=dict)


@dataclass
class SinkTensors:
    """What a forward recorded, in the detector's terms.

    ``hidden[l]``: residual stream entering layer ``l``, ``(B, L, D)``;
    ``column_mass[l]``: :class:`~vlmtools.record.ColumnMass` of layer ``l``;
    ``value_norms[l]``: ``(B, H, L)``; ``joint_columns[l]``: a DiT block's
    :class:`~vlmtools.sinks.dit.JointColumns`. ``layer_names`` name the layers (sites);
    ``signature`` identifies the base LLM for the published sink-dimension table.
    ``attention_layers``: the layers with softmax attention (None: all; a hybrid family's others, e.g.
    Qwen3.5's Gated DeltaNet layers, have no attention to read); ``gated_layers``: those whose attention
    output a sigmoid gate scales.
    """

    layout: TokenLayout
    num_layers: int
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    column_mass: dict[int, ColumnMass] = field(default_factory=dict)
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    joint_columns: dict[int, JointColumns] = field(default_factory=dict)
    layer_names: list[str] | None = None
    signature: tuple | None = None
    attention_layers: list[int] | None = None
    gated_layers: list[int] = field(default_factory=list)
    _norms: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return len(self.layout)

    def valid(self) -> torch.Tensor:
        """``(B, L)`` True for tokens that are not padding (padding is never a sink)."""
        valid = torch.ones(self.batch, self.layout.seq_len, dtype=torch.bool)
        for b, sample in enumerate(self.layout.samples):
            valid[b, sample.padding] = False
        return valid

    def first(self) -> torch.Tensor:
        """``(B,)`` position of each sample's first real token (the primary sink's place)."""
        return torch.tensor([sample.first for sample in self.layout.samples])

    def norms(self, layer: int) -> torch.Tensor:
        """``(B, L)`` fp32 L2 norm of each token entering ``layer``, on the hidden states'
        device, computed once for all criteria (one pass over the layer)."""
        if layer not in self._norms:
            self._norms[layer] = torch.linalg.vector_norm(self.hidden[layer], dim=-1, dtype=torch.float32)
        return self._norms[layer]

    def dense(self) -> torch.Tensor:
        """An empty ``(B, layers, L)`` score map: NaN where a criterion does not look."""
        return torch.full((self.batch, self.num_layers, self.layout.seq_len), float("nan"))


class Criterion:
    """Base of the sink criteria (each is a dataclass; its fields are its settings)."""

    name: ClassVar[str]
    needs: ClassVar[Need | None] = None

    def layer_range(self, num_layers: int) -> list[int]:
        """Layers this criterion reads: its ``layers`` setting, else its default."""
        chosen = getattr(self, "layers", None)
        return self.default_layers(num_layers) if chosen is None else list(chosen)

    def default_layers(self, num_layers: int) -> list[int]:
        return list(range(num_layers))

    def read_layers(self, num_layers: int, attention_layers: Sequence[int] | None = None) -> list[int]:
        """The layers this criterion reads in a model of ``num_layers`` whose ``attention_layers`` (None: all)
        have softmax attention: a criterion that reads attention skips the others by default and refuses them
        when its ``layers`` name one; the residual stream is read in every layer."""
        layers = self.layer_range(num_layers)
        if self.needs not in ATTENTION_NEEDS or attention_layers is None:
            return layers
        missing = [layer for layer in layers if layer not in attention_layers and 0 <= layer < num_layers]
        if missing and getattr(self, "layers", None) is not None:
            raise ValueError(f"{self.name} reads attention, and layers {missing} have none (their token mixer is "
                             f"not softmax attention); the attention layers are {list(attention_layers)}")
        return [layer for layer in layers if layer in attention_layers]

    def layers_in(self, tensors: SinkTensors) -> list[int]:
        """:meth:`read_layers` of the model ``tensors`` come from."""
        return self.read_layers(tensors.num_layers, tensors.attention_layers)

    def evaluate(self, tensors: SinkTensors) -> Evaluation:
        raise NotImplementedError

    def settings(self) -> dict:
        return {"criterion": self.name, **dataclasses.asdict(self)}


def median_over_tokens(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Median of ``x (B, ..., L)`` over each sample's valid positions: ``(B, ..., 1)``."""
    return torch.stack([row[..., keep.to(row.device)].median(-1, keepdim=True).values for row, keep in zip(x, valid)])


def by_layer(tensors: PerLayer) -> dict[int, torch.Tensor]:
    """``{layer: tensor}`` from a mapping or a per-layer sequence (``output_hidden_states[:-1]``)."""
    return dict(tensors) if isinstance(tensors, Mapping) else dict(enumerate(tensors))


def plain_layout(batch: int, seq_len: int, attention_mask: torch.Tensor | None = None) -> TokenLayout:
    """A layout with no images, for tensors from any transformer: padding from the mask."""
    keep = torch.ones(batch, seq_len, dtype=torch.long) if attention_mask is None else attention_mask.cpu()
    samples = []
    for row in keep:
        real = row.nonzero().squeeze(1)
        first = int(real[0]) if real.numel() else 0
        samples.append(
            SampleLayout(
                length=seq_len,
                images=[],
                text=Span(first, seq_len),
                padding=(row == 0).nonzero().squeeze(1),
                layout=torch.empty(0, dtype=torch.long),
                first=first,
            )
        )
    return TokenLayout(samples=samples, seq_len=seq_len, generated_from=seq_len)


def token_roles(sample: SampleLayout) -> list[dict]:
    """Per position: its role, and for visual tokens its image and grid cell (and frame, for a video's frame)."""
    info = [{"role": role} for role in sample.roles()]
    for index, image in enumerate(sample.images):
        cols = image.grid[1]
        frame = {} if getattr(image, "frame", None) is None else {"frame": image.frame[1]}
        for raster, position in enumerate(image.positions.tolist()):
            info[position].update(image=index, row=raster // cols, col=raster % cols, **frame)
    return info
