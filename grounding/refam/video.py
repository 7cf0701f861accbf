"""Video: RefAM frame by frame through the image DiT, with a temporal consistency step.

Every frame gets the same noise (the settings' seeds), so frame-to-frame changes in
the heatmap come from the frames. The consistency step is an exponential moving
average of the min-max-normalised grid heatmaps, ``h'_f = (1 - a) h_f + a h'_{f-1}``,
before the mask is taken: a single frame's stray peak is damped and the mask follows
the object. ``smoothing=0`` gives independent frames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from grounding.masks import upsample

from .method import RefAM, Segmentation


def segment_video(
    refam: RefAM, frames: Sequence[Image.Image], expression: str, smoothing: float = 0.5
) -> list[Segmentation]:
    """One :class:`Segmentation` per frame; ``seg.settings["smoothing"]`` records ``smoothing``.

    >>> segs = segment_video(RefAM(pipe), frames, "the red circle")
    >>> scores.add(segs[i].mask, gt[i], sequence="clip/object")   # J&F with grounding.metrics
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if not frames:
        raise ValueError("segment_video needs at least one frame")
    out, previous = [], None
    for frame in frames:
        seg = refam.segment(frame, expression)
        current = _normalised(seg.grid_heatmap)
        previous = current if previous is None else (1 - smoothing) * current + smoothing * previous
        heatmap = upsample(previous, seg.heatmap.shape)
        mask, point = refam.mask(heatmap, frame)
        out.append(
            dataclasses.replace(
                seg,
                heatmap=heatmap,
                mask=mask,
                point=point,
                grid_heatmap=previous,
                settings={**seg.settings, "smoothing": smoothing},
            )
        )
    return out


def _normalised(h: np.ndarray) -> np.ndarray:
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
