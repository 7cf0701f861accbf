"""``pruning.calibrate``: fit a host's recency trend on held-out inputs and store it by name."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .debias import Fit, Trend, calibration_path, fit_trend
from .host import Host

RESIDUAL_BINS = 10
RESIDUAL_WARNING = 1.5
"""Warn when the residual's largest / smallest row (or column) mean exceeds this: the trend is not 1-D."""


def calibrate(vlm, host: Host, samples: Iterable[dict], fit: Fit = "exponential",
              directory: str | Path | None = None, save: bool = True, progress: bool = True,
              padding: Callable[[dict], torch.Tensor] | None = None) -> list[Trend]:
    """One trend per stage of ``host`` from prefills on ``samples`` (never the evaluation set).

    Runs the host's scorers with nothing dropped, averages the raw score per visual
    index (indices are normalised, so prompts may hold different token counts), fits it
    and, with ``save``, writes ``<model>__<host>__L<layer>.json`` where ``Debias`` finds it.
    ``padding(inputs)`` gives a sample's letterbox mask (e.g. ``letterbox_padding``): padded
    patches then stay out of the average (else the layout's ``ImageTokens.padding``, if known).

    >>> trends = pruning.calibrate(vlm, FastV(keep=64), held_out_inputs)
    >>> with vlm.use(FastV(keep=64, debias=True)):
    ...     model.generate(**inputs)
    """
    if not host.attention_based:
        raise ValueError(f"{host.name} ranks without attention: it has no score trend to calibrate")
    probe = copy.copy(host)
    probe.keep, probe.debias, probe.collect = 1.0, None, True
    collected: dict[int, list] = {stage: [] for stage in range(len(host.layers))}
    for inputs in tqdm(samples, desc=f"calibrating {host.name}", disable=not progress):
        probe.padding = padding(inputs) if padding is not None else host.padding
        with torch.no_grad(), vlm.use(probe) as trace:
            vlm.model(**inputs)
        for stage, entries in trace[probe].collected.items():
            collected[stage] += entries
    trends = []
    for stage, entries in collected.items():
        if not entries:
            raise ValueError("pruning.calibrate: no samples with images were seen")
        key = host.calibration_key(vlm, stage)
        trend = fit_collected(entries, fit, key=key)
        if save:
            trend.save(calibration_path(key, directory))
        trends.append(trend)
    return trends


def fit_collected(entries, fit: Fit = "exponential", key: str = "") -> Trend:
    """The trend of one stage from its collected raw scores, with the residual per tenth of image rows and columns.

    ``entries``: ``(sample layout, visual indices, raw scores, visual count)`` per sample (what a calibration
    run collects, ``trace[host].collected[stage]``). Warns when the residual's largest row (or column) mean
    exceeds its smallest by more than ``RESIDUAL_WARNING``: the trend is then not 1-D.
    """
    trend = fit_trend(_binned_mean(entries), fit, key=key, samples=len(entries))
    trend.rows, trend.columns = _residuals(entries, trend)
    spread = max(max(v) / max(min(v), 1e-12) for v in (trend.rows, trend.columns) if v) if trend.rows else 1.0
    if spread > RESIDUAL_WARNING:
        warnings.warn(f"{key}: the 1-D trend leaves a residual varying {spread:.2f}x across image rows or "
                      "columns (trend.rows / trend.columns); a 1-D debias is approximate here")
    return trend


def _binned_mean(entries) -> torch.Tensor:
    bins = min(count for *_, count in entries)
    total, seen = torch.zeros(bins, dtype=torch.float64), torch.zeros(bins, dtype=torch.float64)
    for _, index, scores, count in entries:
        where = (index.double() / max(count - 1, 1) * (bins - 1)).round().long()
        total.index_add_(0, where, scores.double())
        seen.index_add_(0, where, torch.ones_like(scores, dtype=torch.float64))
    return total / seen.clamp(min=1)


def _residuals(entries, trend: Trend) -> tuple[list[float], list[float]]:
    """Mean of ``a / trend`` per tenth of the first image's rows and columns."""
    sums = torch.zeros(2, RESIDUAL_BINS, dtype=torch.float64)
    seen = torch.zeros(2, RESIDUAL_BINS, dtype=torch.float64)
    for sample, index, scores, count in entries:
        height, width = sample.images[0].grid
        inside = index < height * width
        residual = scores[inside].double() / trend(count)[index[inside]].double()
        residual = residual / residual.mean().clamp(min=1e-12)
        for axis, coordinate, size in ((0, index[inside] // width, height), (1, index[inside] % width, width)):
            where = coordinate * RESIDUAL_BINS // size
            sums[axis].index_add_(0, where, residual)
            seen[axis].index_add_(0, where, torch.ones_like(residual))
    means = sums / seen.clamp(min=1)
    return [[float(v) for v, n in zip(means[axis], seen[axis]) if n] for axis in (0, 1)]
