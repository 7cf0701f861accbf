"""Debiasing a host's score: ``s_i = a_i * m_i / trend_i`` (METHODS.md section 2).

Attention-based scores rise with a visual token's position (later tokens are lower
image rows, and nearer the query): the *trend*. It is fitted once per (model, host,
score layer) on held-out inputs (:func:`pruning.calibrate`), stored as a small JSON
file and loaded by name. ``m_i`` is 0 for tokens whose score means nothing: letterbox
padding, layout tokens (LLaVA-NeXT newlines: never candidates at all, always kept) and
visual sinks from the shared detector (:func:`vlmtools.sinks.visual_sink_positions`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from vlmtools.cache import calibration_dir, model_key, write_json  # noqa: F401 (model_key: pruning's API)

Fit = Literal["exponential", "cubic"]
CUBIC_FLOOR = 1e-3
"""The cubic trend is clamped at this fraction of its maximum, so that a fit crossing zero never divides by ~0."""


@dataclass
class Trend:
    """A fitted recency trend over the normalised visual index ``x = i / (N - 1)``.

    ``exponential``: ``trend = exp(polyval(coef, x))`` (``log mean a = c + k x``, as the
    released weights of four hosts are); ``cubic``: ``trend = polyval(coef, x)`` (the
    FastV weights are the reciprocal of a cubic). ``rows`` / ``columns`` hold the mean
    calibration residual ``a / trend`` per tenth of the image height / width: a 1-D
    trend is trustworthy when both stay near 1 (check this for 2-D rotary positions).
    """

    fit: Fit
    coef: list[float]
    key: str = ""
    samples: int = 0
    rows: list[float] = field(default_factory=list)
    columns: list[float] = field(default_factory=list)

    def __call__(self, count: int, device=None) -> torch.Tensor:
        """Trend values of visual indices ``0 .. count-1``, ``(count,)`` float32."""
        x = torch.linspace(0, 1, count, dtype=torch.float64) if count > 1 else torch.zeros(1, dtype=torch.float64)
        value = _polyval(self.coef, x)
        if self.fit == "exponential":
            value = value.exp()
        else:
            peak = _polyval(self.coef, torch.linspace(0, 1, 101, dtype=torch.float64)).max().clamp(min=1e-12)
            value = value.clamp(min=CUBIC_FLOOR * float(peak))
        return value.float().to(device)

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Trend:
        return cls(**json.loads(Path(path).read_text()))


def _polyval(coef, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for c in coef:
        out = out * x + c
    return out


def fit_trend(mean_scores: torch.Tensor, fit: Fit = "exponential", **meta) -> Trend:
    """Fit ``mean_scores`` (mean raw score per visual index, over calibration samples)."""
    y = mean_scores.double().cpu().numpy()
    x = np.linspace(0, 1, len(y)) if len(y) > 1 else np.zeros(1)
    if fit == "exponential":
        coef = np.polyfit(x, np.log(np.clip(y, 1e-12, None)), 1)
    elif fit == "cubic":
        coef = np.polyfit(x, y, 3)
    else:
        raise ValueError(f"unknown trend fit {fit!r}: use 'exponential' or 'cubic'")
    return Trend(fit=fit, coef=[float(c) for c in coef], **meta)


def debiased(scores: torch.Tensor, index: torch.Tensor, count: int, trend: Trend | None,
             suppressed: torch.Tensor | None) -> torch.Tensor:
    """``s = a * m / trend`` for one sample's candidates.

    ``scores`` are the raw scores ``a`` of candidates with visual indices ``index`` out
    of ``count``; ``suppressed`` flags candidates with ``m = 0``.
    """
    out = scores.float()
    if trend is not None:
        out = out / trend(count, scores.device)[index]
    if suppressed is not None:
        out = out.masked_fill(suppressed, 0.0)
    return out


@dataclass
class Debias:
    """What debiasing does. ``Host(debias=True)`` means ``Debias()``.

    ``trend``: ``"calibrated"`` loads the file made by :func:`pruning.calibrate` for
    this (model, host, layer) from ``directory`` (default: ``$PRUNING_CALIBRATION``, else
    ``calibration/`` in the cache, ``$VLMTOOLS_CACHE`` or ``~/.cache/vlmtools``), a :class:`Trend` or path uses that one for
    every stage, None skips the trend. ``padding``/``sinks`` switch the ``m = 0`` terms; sinks are
    the visual tokens that :func:`vlmtools.sinks.visual_sink_positions` (VAR's sink dimensions)
    finds in the hidden states entering the drop layer.
    """

    trend: Trend | str | Path | None = "calibrated"
    padding: bool = True
    sinks: bool = True
    directory: str | Path | None = None
    sink_settings: dict = field(default_factory=dict)
    """Settings of the shared detector's sink-dimension criterion (``tau``, ``dims``)."""

    def trend_for(self, key: str) -> Trend | None:
        if self.trend is None or isinstance(self.trend, Trend):
            return self.trend
        if self.trend != "calibrated":
            return Trend.load(self.trend)
        path = calibration_path(key, self.directory)
        if not path.exists():
            raise FileNotFoundError(f"pruning: no calibrated trend {path.name} in {path.parent}. Make one with "
                                    "pruning.calibrate(vlm, host, held_out_samples), pass Debias(trend=Trend|path), "
                                    "or Debias(trend=None) to debias without a trend")
        return Trend.load(path)

    def settings(self) -> dict:
        trend = (self.trend.key or "given") if isinstance(self.trend, Trend) else str(self.trend)
        return {"trend": trend, "padding": self.padding, "sinks": self.sinks and {"criterion": "sink_dims",
                                                                                  **self.sink_settings}}


def calibration_path(key: str, directory: str | Path | None = None) -> Path:
    """``<directory>/<model>__<host>__<layer>.json`` in :func:`vlmtools.cache.calibration_dir`."""
    return calibration_dir(directory) / f"{key}.json"
