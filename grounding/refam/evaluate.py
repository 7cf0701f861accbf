"""Scoring RefAM: samples of any source (RefCOCO-style data here), ablations and model-free baselines.

A sample is ``(image, expression, target mask)``. ``score`` runs any segmenter over
samples into :class:`~grounding.metrics.SegmentationScores` (mIoU, oIoU, point
accuracy). Baselines need no model: the whole image, and a centre box (the middle
half of each side), both pointing at the centre.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from grounding.metrics import SegmentationScores

ABLATIONS: dict[str, dict] = {
    "full": {},
    "no magnets": {"magnets": ()},
    "no sink handling": {"sinks": "none"},
    "no stop-word filtering": {"words": "expression"},
    "all words": {"words": "all"},
}
"""Settings each ablation changes from the full method (``all words``: magnets and special tokens too)."""


@dataclass
class Sample:
    image: Image.Image
    expression: str
    mask: np.ndarray  # (H, W) bool, the image's size


def refcoco_samples(refs: str, instances: str, images: str, split: str, n: int | None = None) -> Iterator[Sample]:
    """RefCOCO-style samples at their own resolution (see ``refam_segmenter(size=...)``)."""
    from grounding.refcoco import RefCOCO

    data = RefCOCO(refs, instances, images, split=split)
    for i in range(len(data) if n is None else min(n, len(data))):
        item = data[i]
        yield Sample(Image.open(item.image_path).convert("RGB"), item.sentence, item.mask)


def baseline(kind: str, shape: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """``whole image`` or ``centre box``: (mask, centre point)."""
    height, width = shape
    mask = np.zeros(shape, bool)
    if kind == "whole image":
        mask[:] = True
    elif kind == "centre box":
        mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    else:
        raise ValueError(f"unknown baseline {kind!r}: 'whole image' or 'centre box'")
    return mask, (width // 2, height // 2)


def score(
    segment: Callable[[Sample], tuple[np.ndarray, tuple[int, int]]], samples: Iterable[Sample]
) -> tuple[SegmentationScores, float]:
    """Scores of ``segment(sample) -> (mask, point)`` over ``samples``, and seconds per sample."""
    scores, count, start = SegmentationScores(), 0, time.perf_counter()
    for sample in samples:
        mask, point = segment(sample)
        scores.add(mask, sample.mask, point=point)
        count += 1
    return scores, (time.perf_counter() - start) / max(count, 1)


def refam_segmenter(refam, size: tuple[int, int] | None = None) -> Callable[[Sample], tuple[np.ndarray, tuple]]:
    """``sample -> (mask, point)`` with RefAM; with ``size`` (W, H) the image is resized to what the model
    takes and the mask (nearest) and point are mapped back, so scores are at the sample's resolution."""

    def segment(sample: Sample):
        if size is None:
            seg = refam.segment(sample.image, sample.expression)
            return seg.mask, seg.point
        seg = refam.segment(sample.image.resize(size, Image.BILINEAR), sample.expression)
        width, height = sample.image.size
        mask = np.asarray(Image.fromarray(seg.mask).resize((width, height), Image.NEAREST))
        x, y = seg.point
        return mask, (min(int(x * width / size[0]), width - 1), min(int(y * height / size[1]), height - 1))

    return segment


def table(rows: dict[str, SegmentationScores], seconds: dict[str, float] | None = None) -> str:
    """A Markdown table: one row per method, mIoU, oIoU, point accuracy (and s/image when timed)."""
    seconds = seconds or {}
    lines = ["| method | mIoU | oIoU | point acc. | s/image |", "|---|---|---|---|---|"]
    for name, scores in rows.items():
        s = scores.summary()
        timed = f"{seconds[name]:.3f}" if name in seconds else "-"
        lines.append(f"| {name} | {s['miou']:.3f} | {s['oiou']:.3f} | {s['point_acc']:.3f} | {timed} |")
    return "\n".join(lines)
