import doctest

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import vlmtools.masks
from grounding import masks
from grounding.masks import heatmap_to_mask, overlay, peak_point, upsample
from grounding.metrics import iou


def two_blobs(shape=(40, 60)):
    """A big, weaker blob on the left and a small, stronger one on the right."""
    h = np.zeros(shape)
    h[5:30, 5:25] = 0.6
    h[10:14, 45:49] = 1.0
    return h


def test_peak_point_is_x_y():
    h = np.zeros((5, 9))
    h[3, 7] = 2.0
    assert peak_point(h) == (7, 3)
    assert peak_point(torch.tensor(h)) == (7, 3)
    assert peak_point(np.ones((3, 3))) == (0, 0)  # ties: first in raster order


def test_keep_largest_peak_all():
    h = two_blobs()
    big, small = np.zeros(h.shape, bool), np.zeros(h.shape, bool)
    big[5:30, 5:25], small[10:14, 45:49] = True, True
    assert (heatmap_to_mask(h) == big).all()
    assert (heatmap_to_mask(h, keep="peak") == small).all()
    assert (heatmap_to_mask(h, keep="all") == (big | small)).all()
    # a fixed threshold above the weak blob keeps only the strong one
    assert (heatmap_to_mask(h, method="threshold", threshold=0.7, keep="all") == small).all()
    assert heatmap_to_mask(torch.tensor(h, dtype=torch.bfloat16)).dtype == bool


def test_otsu_recovers_an_object_in_noise():
    rng = np.random.default_rng(0)
    gt = np.zeros((64, 64), bool)
    gt[20:44, 10:30] = True
    h = gt * 1.0 + rng.normal(0, 0.15, gt.shape)
    assert iou(heatmap_to_mask(h), gt) > 0.9
    # 8-connectivity: a diagonal chain is one component
    d = np.eye(6)
    assert heatmap_to_mask(d, method="threshold", threshold=0.5).sum() == 6


def test_constant_heatmap_gives_empty_mask():
    assert not heatmap_to_mask(np.full((4, 4), 3.0)).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "kmeans"}, "method must be"),
    ({"keep": "biggest"}, "keep must be"),
    ({"method": "threshold", "threshold": 1.0}, r"in \[0, 1\)"),
])  # fmt: skip
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        heatmap_to_mask(two_blobs(), **kwargs)


def test_bad_heatmaps():
    with pytest.raises(ValueError, match="2-D"):
        heatmap_to_mask(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        peak_point(np.array([[0.0, np.nan]]))


def test_upsample_matches_cv2_bilinear():
    rng = np.random.default_rng(1)
    h = rng.random((6, 8)).astype(np.float32)
    up = upsample(torch.from_numpy(h), (48, 40))
    assert up.shape == (48, 40)
    np.testing.assert_allclose(up, cv2.resize(h, (40, 48), interpolation=cv2.INTER_LINEAR), atol=1e-5)
    with pytest.raises(ValueError, match="height, width"):
        upsample(h, (0, 10))


def test_overlay():
    image = Image.fromarray(np.full((60, 80, 3), 40, np.uint8))
    h = np.zeros((6, 8))
    h[1:3, 5:7] = 1.0
    mask = heatmap_to_mask(upsample(h, (60, 80)))
    out = overlay(image, h, mask, alpha=0.0)  # alpha 0: only the drawings change the image
    assert out.mode == "RGB" and out.size == (80, 60)
    px = np.asarray(out)
    changed = (px != 40).any(axis=2)
    assert changed.any() and (px[changed] == 255).all()  # white outline and marker only
    ys, xs = np.nonzero(changed)
    x_peak, y_peak = peak_point(upsample(h, (60, 80)))
    assert changed[y_peak, x_peak]
    assert xs.min() >= 40 and ys.max() < 35  # all drawing is around the hot region
    blended = np.asarray(overlay(image, h, alpha=1.0)).astype(int)
    assert blended[0, 0, 2] > blended[0, 0, 0]  # cold = blue in jet
    with pytest.raises(ValueError, match="mask shape"):
        overlay(image, h, mask[:10])


def test_docstring_examples():
    for module in (masks, vlmtools.masks):  # the mask, point and resize examples live in vlmtools.masks
        assert doctest.testmod(module).failed == 0
