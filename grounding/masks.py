"""From a heatmap to a mask, a point and a picture, without any model.

RefAM's default output: threshold the text-to-image attention heatmap (Otsu by
default), keep one connected component, and always report the peak point (the
prompt a SAM-style model would take). Heatmaps are 2-D numpy arrays or torch
tensors, higher = more likely the referred object; points are (x, y) pixels.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image
from skimage.filters import threshold_otsu
from skimage.measure import label


def _as_array(heatmap: np.ndarray | torch.Tensor) -> np.ndarray:
    h = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap, float)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {h.shape}: average heads/words first")
    if not np.isfinite(h).all():
        raise ValueError("heatmap has NaN or inf values")
    return h


def _normalise(h: np.ndarray) -> np.ndarray | None:
    """Min-max to [0, 1]; None for a constant heatmap, which points nowhere."""
    lo, hi = h.min(), h.max()
    return (h - lo) / (hi - lo) if hi > lo else None


def peak_point(heatmap: np.ndarray | torch.Tensor) -> tuple[int, int]:
    """(x, y) of the heatmap's maximum (the first in raster order on a tie).

    >>> peak_point(np.array([[0, 0, 0], [0, 0, 5]]))
    (2, 1)
    """
    h = _as_array(heatmap)
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
    h = torch.from_numpy(_as_array(heatmap))[None, None]
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
    h = _as_array(heatmap)
    norm = _normalise(h)
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


def overlay(
    image: Image.Image | np.ndarray,
    heatmap: np.ndarray | torch.Tensor,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """The image under a jet-coloured heatmap, with the mask's outline and the peak marked (white).

    The heatmap is upsampled to the image; `mask`, if given, must have the image's size.

        >>> overlay(Image.new("RGB", (64, 48)), np.random.rand(6, 8)).size
        (64, 48)
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {rgb.shape}")
    height, width = rgb.shape[:2]
    h = _as_array(heatmap)
    if h.shape != (height, width):
        h = upsample(h, (height, width))
    norm = _normalise(h)
    grey = np.zeros(h.shape, np.uint8) if norm is None else np.round(norm * 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(grey, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = np.round((1 - alpha) * rgb + alpha * colour).astype(np.uint8)
    line = max(1, round(min(height, width) / 200))
    white = (255, 255, 255)
    if mask is not None:
        if mask.shape != (height, width):
            raise ValueError(
                f"mask shape {mask.shape} differs from the image's {(height, width)}: upsample the heatmap first"
            )
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, white, line)
    cv2.drawMarker(out, peak_point(h), white, cv2.MARKER_CROSS, max(7, 6 * line), line)
    return Image.fromarray(out)
