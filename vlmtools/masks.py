"""Heatmaps to masks, and the overlap of masks, without any model.

Shared by grounding (RefAM, its metrics) and the zoo's own evaluation. Heatmaps are
2-D numpy arrays or torch tensors, higher = more likely the referred object; masks
are boolean arrays; points are (x, y) pixels.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from skimage.filters import threshold_otsu
from skimage.measure import label


def as_heatmap(heatmap: np.ndarray | torch.Tensor) -> np.ndarray:
    """A finite 2-D float array from a numpy array or a tensor."""
    h = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap, float)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {h.shape}: average heads/words first")
    if not np.isfinite(h).all():
        raise ValueError("heatmap has NaN or inf values")
    return h


def normalise(h: np.ndarray) -> np.ndarray | None:
    """Min-max to [0, 1]; None for a constant heatmap, which points nowhere."""
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo) if hi > lo else None


def peak_point(heatmap: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(x, y) of the heatmap's maximum (the first in raster order on a tie).

    >>> peak_point(np.array([[0, 0, 0], [0, 0, 5]]))
    (2, 1)
    """
    h = as_heatmap(heatmap)
    y, x = np.unravel_index(np.argmax(h), h.shape)
    return int(x), int(y)


def upsample(heatmap: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a low-resolution heatmap to `size = (height, width)`.

    Half-pixel centres (`align_corners=False`), as cv2.resize and PIL do.

        >>> upsample(np.zeros((24, 24)), (336, 448)).shape
        (336, 448)
    """
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (height, width) with both >= 1, got {size}")
    h = torch.from_numpy(as_heatmap(heatmap))[None, None]
    out = torch.nn.functional.interpolate(h, size=tuple(size), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def heatmap_to_mask(
    heatmap: np.ndarray | torch.Tensor,
    method: Literal["otsu", "threshold"] = "otsu",
    threshold: float = 0.5,
    keep: Literal["largest", "peak", "all"] = "largest",
) -> np.ndarray:
    """Boolean mask of the heatmap's high region.

    The heatmap is min-max normalised to [0, 1]; pixels above Otsu's threshold
    (`method="otsu"`) or above `threshold` (`method="threshold"`) are foreground.
    Of the 8-connected components, `keep` the largest, the one holding the peak,
    or all. A constant heatmap gives an empty mask.

        >>> h = np.zeros((8, 8)); h[1:3, 1:3] = 1.0; h[5:8, 4:8] = 0.8
        >>> [int(heatmap_to_mask(h, keep=k).sum()) for k in ("largest", "peak", "all")]
        [12, 4, 16]
    """
    if method not in ("otsu", "threshold"):
        raise ValueError(f"method must be 'otsu' or 'threshold', got {method!r}")
    if keep not in ("largest", "peak", "all"):
        raise ValueError(f"keep must be 'largest', 'peak' or 'all', got {keep!r}")
    if method == "threshold" and not 0 <= threshold < 1:
        raise ValueError(f"threshold applies to the [0, 1]-normalised heatmap and must be in [0, 1), got {threshold}")
    h = as_heatmap(heatmap)
    norm = normalise(h)
    if norm is None:
        return np.zeros(h.shape, bool)
    mask = norm > (threshold_otsu(norm) if method == "otsu" else threshold)
    if keep == "all":
        return mask
    components = label(mask, connectivity=2)
    if keep == "peak":
        x, y = peak_point(h)
        return components == components[y, x]  # the peak (value 1) is always above the threshold
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background
    return components == sizes.argmax()


def check_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks of one shape, as arrays."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: pred {pred.shape}, gt {gt.shape}; resize the prediction to the image")
    for name, m in (("pred", pred), ("gt", gt)):
        if m.dtype != bool:
            raise TypeError(f"{name} mask must be boolean, got {m.dtype}: threshold it first (e.g. heatmap_to_mask)")
    return pred, gt


def overlap(pred: np.ndarray, gt: np.ndarray) -> tuple[float, int, int]:
    """IoU (1.0 when both masks are empty, as DAVIS has it), intersection, union."""
    inter, union = int((pred & gt).sum()), int((pred | gt).sum())
    return (inter / union if union else 1.0), inter, union


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty (DAVIS's convention).

    >>> iou(np.array([1, 1, 0], bool), np.array([0, 1, 1], bool))
    0.3333333333333333
    """
    return overlap(*check_masks(pred, gt))[0]
