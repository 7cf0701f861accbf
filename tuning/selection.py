"""The heads a calibration chose for a method, stored as JSON by model name (as the pruning trends are)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmtools.cache import calibration_dir, model_key, write_json

Heads = dict[int, list[int]]
"""Decoder layer -> the attention heads (query heads) edited there."""


def selection_path(model: str, method: str, directory: str | Path | None = None) -> Path:
    """``<directory>/<model>__<method>.json`` in :func:`vlmtools.cache.calibration_dir`."""
    return calibration_dir(directory) / f"{model}__{method}.json"


def normalise_heads(heads) -> Heads:
    """``{layer: [head, ...]}`` with int keys, sorted unique heads, and no empty layer."""
    out = {}
    for layer, chosen in dict(heads).items():
        chosen = sorted({int(h) for h in ([chosen] if isinstance(chosen, int) else chosen)})
        if chosen:
            out[int(layer)] = chosen
    return dict(sorted(out.items()))


@dataclass
class HeadSelection:
    """What :func:`tuning.calibrate` found for one method on one model.

    ``heads``: the heads the method edits (``{layer: [head, ...]}``); ``gamma``: ZeroTuning's factor for
    them (None for ACT); ``groups``: ZeroTuning's heads by the direction that helped alone (``"up"``: gamma
    above 1, ``"down"``: below), ``heads`` being the larger group; ``baseline``: the unedited calibration
    accuracy; ``profile``: one ``{"layer", "head", "setting", "accuracy"}`` per head and setting tried;
    ``score``: how a sample was scored; ``settings``: the method's settings during the search.
    """

    method: str
    model: str
    heads: Heads
    gamma: float | None = None
    groups: dict[str, Heads] = field(default_factory=dict)
    baseline: float | None = None
    samples: int = 0
    score: str = ""
    profile: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.heads = normalise_heads(self.heads)
        self.groups = {name: normalise_heads(group) for name, group in self.groups.items()}

    def save(self, directory: str | Path | None = None) -> Path:
        """Write ``<model>__<method>.json`` where ``ACT()`` / ``ZeroTuning()`` find it."""
        return write_json(selection_path(self.model, self.method, directory), asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> HeadSelection:
        return cls(**json.loads(Path(path).read_text()))

    @classmethod
    def stored(cls, vlm, method: str, directory: str | Path | None = None) -> HeadSelection:
        """The selection saved for ``vlm``'s model; a ValueError naming how to make one when there is none."""
        path = selection_path(model_key(vlm), method, directory)
        if not path.exists():
            name = {"act": "ACT", "zerotuning": "ZeroTuning"}.get(method, method)
            raise ValueError(f"{name}: no head selection stored for {model_key(vlm)} ({path}); make one with "
                             f"tuning.calibrate(vlm, {name}(...), labelled_samples) or pass {name}(heads={{layer: "
                             "[head, ...]}})")
        return cls.load(path)


def resolve_heads(name: str, heads, vlm, directory: str | Path | None = None) -> tuple[Heads, HeadSelection | None]:
    """The heads a method edits on ``vlm``: ``heads`` as given (a mapping or a :class:`HeadSelection`), else the
    stored selection (:meth:`HeadSelection.stored`); each checked against the model (ValueError naming the
    layers with attention and the head count)."""
    selection = heads if isinstance(heads, HeadSelection) else None
    if heads is None:
        selection = HeadSelection.stored(vlm, name.lower(), directory)
    chosen = normalise_heads(selection.heads if selection is not None else heads)
    if not chosen:
        where = f"the selection for {selection.model} ({selection.samples} samples)" if selection else "heads"
        raise ValueError(f"{name}: {where} holds no head to edit (none beat the unedited accuracy); the method "
                         "would change nothing")
    attention = set(vlm.attention_layers)
    for layer, listed in chosen.items():
        if layer not in attention:
            raise ValueError(f"{name}: layer {layer} has no attention to edit; the attention layers are "
                             f"{sorted(attention)}")
        count = vlm.site(f"text.{layer}").heads
        if listed[0] < 0 or listed[-1] >= count:
            raise ValueError(f"{name}: head {listed[-1] if listed[-1] >= count else listed[0]} in layer {layer} "
                             f"does not exist (the layer has heads 0 .. {count - 1})")
    return chosen, selection


def heads_source(heads) -> str:
    """Where a method's heads came from, for its settings: given, a selection object, or the stored one."""
    return "stored" if heads is None else "selection" if isinstance(heads, HeadSelection) else "given"
