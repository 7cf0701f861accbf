"""SinkReport: what the detector found, as findings, a summary table, JSON and a PNG."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from .base import Finding

ROLE_COLOURS = {
    "padding": "#dddddd",
    "first": "#d62728",
    "visual": "#2ca02c",
    "layout": "#9467bd",
    "text": "#1f77b4",
    "generated": "#ff7f0e",
}


@dataclass
class SinkReport:
    """Findings of every criterion on one batch, with the settings that produced them.

    ``scores[criterion]`` is a dense ``(B, layers, L)`` map (NaN where not evaluated):
    the criterion's score per token, or for per-head criteria the share of heads that
    fired. ``tokens[b][t]`` is token t's role (and image, row, col for visual tokens);
    ``grids[b]`` the (rows, cols) of each image of sample b; ``layer_names[l]`` the site
    of layer l (``text.3``, ``dit.double.1``). ``layer_kinds`` is empty when every layer is plain
    softmax attention; for a hybrid or gated family it lists the layers with ``attention``, the
    ``linear`` ones (no attention map: the attention criteria do not read them, each criterion's
    settings say which layers it read, ``read_layers``) and the ``gated`` ones (attention output
    scaled by a sigmoid gate), and :meth:`notes` says what that means for the findings.

    >>> report = SinkDetector().detect(vlm, inputs)
    >>> print(report.table())
    >>> report.plot("sinks.png")
    """

    findings: list[Finding]
    scores: dict[str, torch.Tensor]
    tokens: list[list[dict]]
    grids: list[list[tuple[int, int]]]
    settings: list[dict]
    layer_names: list[str]
    layer_kinds: dict[str, list[int]] = field(default_factory=dict)

    def sinks(
        self, criterion: str | None = None, sample: int | None = None, role: str | None = None, layer: int | None = None
    ) -> list[Finding]:
        """Findings filtered by criterion, sample, role and layer (None: any)."""
        return [
            f
            for f in self.findings
            if (criterion is None or f.criterion == criterion)
            and (sample is None or f.sample == sample)
            and (role is None or f.role == role)
            and (layer is None or f.layer == layer)
        ]

    def summary(self) -> list[dict]:
        """One row per (sample, criterion, token): layers where it fired and its score.

        The score of a per-head criterion is the share of evaluated (layer, head) pairs
        where the token fired (for column mass: the published sink score); otherwise the
        largest score over layers.
        """
        groups: dict[tuple, list[Finding]] = defaultdict(list)
        for f in self.findings:
            groups[(f.sample, f.criterion, f.token)].append(f)
        rows = []
        for (sample, criterion, token), found in sorted(groups.items()):
            if found[0].head is not None:
                score = float(self.scores[criterion][sample, :, token].nanmean())
            else:
                score = max(f.score for f in found)
            top = max(found, key=lambda f: f.score)
            rows.append(
                {
                    "sample": sample,
                    "criterion": criterion,
                    "token": token,
                    "role": _role(found[0]),
                    "layers": sorted({f.layer for f in found if f.layer is not None}),
                    "hits": len(found),
                    "score": score,
                    "dims": sorted({d for f in found for d in f.dims}),
                    "label": top.label,
                }
            )
        return rows

    def notes(self) -> list[str]:
        """What the model's layers mean for the findings: which layers each criterion read, the layers with no
        attention map, the gated ones. Empty for a model whose layers are all plain softmax attention."""
        if not self.layer_kinds:
            return []
        kinds = self.layer_kinds
        notes = [f"attention layers {_ranges(kinds['attention'])}"
                 + (f"; no attention map (linear attention) in {_ranges(kinds['linear'])}" if kinds["linear"] else "")]
        notes += [f"{s['criterion']} read layers {_ranges(s['read_layers'])}" for s in self.settings if "read_layers" in s]
        if kinds["gated"]:
            notes.append(f"gated attention (a sigmoid gate scales each head's output) in {_ranges(kinds['gated'])}: "
                         "trained with it, attention no longer needs a first-token sink (Qiu et al. 2025, Gated "
                         "Attention for LLMs), so column-mass sinks there are not expected in trained weights")
        return notes

    def table(self) -> str:
        """The summary as fixed-width text (then the :meth:`notes` on the model's layers, if any)."""
        rows = [["sample", "criterion", "token", "role", "layers", "hits", "score", "dims/label"]]
        for r in self.summary():
            extra = " ".join(filter(None, [",".join(map(str, r["dims"])), r["label"]]))
            rows.append(
                [
                    str(r["sample"]),
                    r["criterion"],
                    str(r["token"]),
                    r["role"],
                    _ranges(r["layers"]),
                    str(r["hits"]),
                    f"{r['score']:.3g}",
                    extra,
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        return "\n".join(lines + [f"note: {note}" for note in self.notes()])

    def to_json(self) -> str:
        return json.dumps(
            {
                "layer_names": self.layer_names,
                "settings": self.settings,
                "tokens": self.tokens,
                "grids": self.grids,
                "findings": [dataclasses.asdict(f) for f in self.findings],
                "scores": {name: _nan_to_none(map_) for name, map_ in self.scores.items()},
                **({"layer_kinds": self.layer_kinds} if self.layer_kinds else {}),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SinkReport:
        data = json.loads(text)
        return cls(
            findings=[Finding(**{**f, "dims": tuple(f["dims"])}) for f in data["findings"]],
            scores={name: torch.from_numpy(np.array(map_, dtype=np.float32)) for name, map_ in data["scores"].items()},
            tokens=data["tokens"],
            grids=[[tuple(g) for g in grids] for grids in data["grids"]],
            settings=data["settings"],
            layer_names=data["layer_names"],
            layer_kinds=data.get("layer_kinds", {}),
        )

    def plot(self, path, sample: int = 0):
        """Layer x token heatmap per criterion with sinks marked (x), a strip of token
        roles with positional sinks (v), and each image's grid with how often each
        visual token fired (criterion-layer pairs). Saved to ``path``; returns the
        matplotlib ``Figure`` (a notebook shows it)."""
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure  # no pyplot: the caller's backend (e.g. a notebook's) is left alone
        from matplotlib.ticker import MaxNLocator

        names = list(self.scores)
        grids = self.grids[sample]
        rows = max(len(names), len(grids), 1) + 1
        fig = Figure(figsize=(12 if grids else 9, 1.0 + 2.2 * rows))
        spec = fig.add_gridspec(
            rows, 2 if grids else 1, width_ratios=[4, 1] if grids else None, height_ratios=[0.3] + [1] * (rows - 1)
        )
        order = list(ROLE_COLOURS)
        ax = strip = fig.add_subplot(spec[0, 0])
        roles = strip.imshow(
            [[order.index(t["role"]) for t in self.tokens[sample]]],
            aspect="auto",
            cmap=ListedColormap(list(ROLE_COLOURS.values())),
            vmin=-0.5,
            vmax=len(order) - 0.5,
            interpolation="nearest",
        )
        legend = fig.colorbar(roles, ax=strip, fraction=0.02, ticks=range(len(order)))
        legend.ax.set_yticklabels(order, fontsize=6)
        strip.set_yticks([])
        strip.set_title("token roles; v = positional sink, x = sink in that layer", fontsize=8)
        for f in self.sinks("positional", sample):
            strip.plot(f.token, 0, "v", color="black")
        for row, name in enumerate(names, start=1):
            values = self.scores[name][sample].numpy()
            seen = values[np.isfinite(values)]
            # magnitudes that span decades (massive activations) read better on a log scale
            log = seen.size and seen.min() > 0 and seen.max() > 100 * np.median(seen)
            ax = fig.add_subplot(spec[row, 0], sharex=strip)
            image = ax.imshow(
                values,
                aspect="auto",
                origin="lower",
                interpolation="nearest",
                cmap="viridis",
                norm="log" if log else None,
            )
            fig.colorbar(image, ax=ax, fraction=0.02)
            cells = {(f.token, f.layer) for f in self.sinks(name, sample)}
            if cells:
                ax.scatter(*zip(*cells), marker="x", color="red", s=12)
            ax.set_ylabel(f"{name}\nlayer", fontsize=8)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            self._mark_layers(ax, name)
        ax.set_xlabel("token position")
        for index, (grid_rows, grid_cols) in enumerate(grids):
            count = np.zeros((grid_rows, grid_cols))
            for f in self.findings:
                if f.sample == sample and f.image == index:
                    count[f.row, f.col] += 1
            ax = fig.add_subplot(spec[index + 1, 1])
            cells = ax.imshow(count, cmap="magma", interpolation="nearest", vmin=0)
            fig.colorbar(cells, ax=ax, fraction=0.05)
            sinks = np.argwhere(count > 0)
            if len(sinks):
                ax.scatter(sinks[:, 1], sinks[:, 0], marker="o", facecolors="none", edgecolors="cyan", s=30)
            # a few sink cells on a large grid leave the panel nearly black: say how many there are
            ax.set_title(f"image {index}: sink hits per cell\n{len(sinks)} of {count.size} cells fired", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        return fig


    def _mark_layers(self, ax, criterion: str) -> None:
        """Grey bands on the layers a criterion could not read (no attention map), an orange tick on gated ones."""
        if not self.layer_kinds:
            return
        read = next((s.get("read_layers") for s in self.settings if s.get("criterion") == criterion), None)
        linear = self.layer_kinds["linear"]
        unread = linear if read is not None and not set(read) & set(linear) else []  # it reads attention
        for layer in unread:
            ax.axhspan(layer - 0.5, layer + 0.5, color="#bbbbbb", alpha=0.5, linewidth=0)
        gated = self.layer_kinds["gated"]
        if gated:
            ax.scatter([0] * len(gated), gated, marker=">", color="orange", s=18, clip_on=False, zorder=3)
        ax.set_title(("grey: no attention map (linear-attention layers); " if unread else "")
                     + ("> : gated attention layers" if gated else ""), fontsize=7, loc="right")


def _role(f: Finding) -> str:
    if f.role != "visual":
        return f.role
    return f"visual {f.image}:({f.row},{f.col})" if f.frame is None else f"visual frame {f.frame}:({f.row},{f.col})"


def _ranges(layers: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4,7'."""
    if not layers:
        return "-"
    parts, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ",".join(parts)


def _nan_to_none(map_: torch.Tensor) -> list:
    values = map_.numpy().astype(object)
    values[np.isnan(map_.numpy())] = None
    return values.tolist()
