"""From a heatmap to a mask, a point and a picture, without any model.

RefAM's default output: threshold the text-to-image attention heatmap (Otsu by
default), keep one connected component, and always report the peak point (the
prompt a SAM-style model would take). Heatmaps are 2-D numpy arrays or torch
tensors, higher = more likely the referred object; points are (x, y) pixels.
The mask, point and resize are vlmtools' (``vlmtools.masks``, shared with the
zoo's evaluation); the picture is drawn here.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from vlmtools.masks import as_heatmap, heatmap_to_mask, normalise, peak_point, upsample

__all__ = ["heatmap_to_mask", "overlay", "peak_point", "upsample"]


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
    h = as_heatmap(heatmap)
    if h.shape != (height, width):
        h = upsample(h, (height, width))
    norm = normalise(h)
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
