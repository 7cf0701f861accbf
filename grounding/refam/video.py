"""Video: RefAM in one pass over a clip on a video DiT, or frame by frame (the baseline).

``path="clip"`` (the paper's, the default on a video DiT: Mochi, Wan): one forward per
timestep and seed over the whole clip's latents at the chosen flow time; each video frame
takes the heatmap of the latent frame that holds it, through the image method's magnets,
sinks and mask step (:meth:`~grounding.refam.method.RefAM.segment_clip`).

``path="frames"`` (the default on an image DiT): each frame segmented alone, every frame
with the same noise (the settings' seeds), so frame-to-frame changes in the heatmap come
from the frames; on a video DiT each frame is then a clip of one frame.

The consistency step, either path, is an exponential moving average of the
min-max-normalised grid heatmaps (``seg.grid_heatmap`` holds the result), ``h'_f = (1 - a) h_f + a h'_{f-1}``, before the mask is
taken: a single frame's stray peak is damped and the mask follows the object.
``smoothing=0`` gives independent frames; by default 0.5 frame by frame and 0 on the clip
path, whose frames already attend to each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

from grounding.masks import upsample

from .method import RefAM, Segmentation

Path = Literal["auto", "clip", "frames"]


def segment_video(
    refam: RefAM,
    frames: Sequence[Image.Image],
    expression: str,
    smoothing: float | None = None,
    path: Path = "auto",
) -> list[Segmentation]:
    """One :class:`Segmentation` per frame; ``seg.settings`` records ``path`` and ``smoothing``.

    >>> segs = segment_video(RefAM(pipe), frames, "the red circle")
    >>> scores.add(segs[i].mask, gt[i], sequence="clip/object")   # J&F with grounding.metrics
    """
    if path not in Path.__args__:
        raise ValueError(f"path must be one of {Path.__args__}, got {path!r}")
    if not frames:
        raise ValueError("segment_video needs at least one frame")
    video = refam.source.temporal is not None
    path = ("clip" if video else "frames") if path == "auto" else path
    smoothing = (0.0 if path == "clip" else 0.5) if smoothing is None else smoothing
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if path == "clip":
        segs = refam.segment_clip(frames, expression)
    elif video:
        segs = [refam.segment_clip([frame], expression)[0] for frame in frames]
    else:
        segs = [refam.segment(frame, expression) for frame in frames]
    out, previous = [], None
    for frame, seg in zip(frames, segs):
        settings = {**seg.settings, "path": path, "smoothing": smoothing}
        current = _normalised(seg.grid_heatmap)
        previous = current if previous is None else (1 - smoothing) * current + smoothing * previous
        heatmap = upsample(previous, seg.heatmap.shape)
        mask, point = refam.mask(heatmap, frame)
        out.append(dataclasses.replace(seg, heatmap=heatmap, mask=mask, point=point, grid_heatmap=previous,
                                       settings=settings))
    return out


def _normalised(h: np.ndarray) -> np.ndarray:
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)
