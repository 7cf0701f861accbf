import doctest

import numpy as np
import pytest

from grounding import metrics
from grounding.metrics import SegmentationScores, boundary_f, iou


def box(shape, y0, y1, x0, x1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_iou():
    a, b = box((10, 10), 0, 4, 0, 4), box((10, 10), 2, 6, 0, 4)
    assert iou(a, b) == pytest.approx(8 / 24)
    assert iou(a, np.zeros_like(a)) == 0.0
    assert iou(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_boundary_f_tolerance_scales_with_the_diagonal():
    # a 2-pixel shift is within tolerance at 100x100 (radius ceil(0.008*141)=2),
    # not at 50x50 (radius 1)
    for size, expect_one in ((100, True), (50, False)):
        a = box((size, size), 10, 30, 10, 30)
        b = box((size, size), 10, 30, 12, 32)
        f = boundary_f(a, b)
        assert (f == 1.0) is expect_one, (size, f)
        assert 0.0 < f <= 1.0
        assert boundary_f(b, a) == pytest.approx(f)  # F swaps P and R: symmetric
    a, b = box((50, 50), 10, 30, 10, 30), box((50, 50), 10, 30, 12, 32)
    assert boundary_f(a, b, bound_th=2) == 1.0  # bound_th >= 1 is in pixels


def test_boundary_f_empty_masks():
    a, empty = box((20, 20), 5, 10, 5, 10), np.zeros((20, 20), bool)
    assert boundary_f(empty, empty) == 1.0
    assert boundary_f(a, empty) == 0.0 and boundary_f(empty, a) == 0.0


def test_boundary_f_is_about_contours_not_area():
    # a thin gap in the prediction barely changes IoU but adds a lot of boundary
    gt = box((100, 100), 10, 90, 10, 90)
    pred = gt.copy()
    pred[10:90, 49:51] = False
    assert iou(pred, gt) > 0.97
    assert boundary_f(pred, gt) < 0.85  # P ~ 2/3 (the gap adds ~half again the contour), R = 1


def test_miou_oiou_and_point_accuracy():
    s = SegmentationScores()
    big, small = box((10, 10), 0, 10, 0, 8), box((10, 10), 0, 1, 0, 2)
    s.add(big, big, point=(7, 9))  # IoU 1 on 80 px, point inside
    s.add(np.zeros_like(small), small, point=(2, 0))  # IoU 0 on 2 px, point just outside
    r = s.summary()
    assert r["miou"] == 0.5
    assert r["oiou"] == pytest.approx(80 / 82)  # large objects dominate
    assert r["point_acc"] == 0.5 and r["n_points"] == 2 and r["n"] == 2
    assert "J&F" not in r


def test_point_accuracy_only_over_samples_with_points():
    s = SegmentationScores()
    m = box((4, 4), 0, 2, 0, 2)
    s.add(m, m)
    s.add(m, m, point=(3, 3))
    assert s.summary()["point_acc"] == 0.0


def test_jf_averages_frames_then_sequences():
    s = SegmentationScores()
    gt = box((30, 30), 5, 20, 5, 20)
    s.add(gt, gt, sequence="v1/obj1")
    for _ in range(3):
        s.add(np.zeros_like(gt), gt, sequence="v2/obj1")
    r = s.summary()
    assert r["J"] == 0.5 and r["F"] == 0.5 and r["J&F"] == 0.5  # pooled frames would give 0.25
    assert r["n_sequences"] == 2 and r["miou"] == 0.25


def test_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        gt = box((40, 50), *sorted(rng.integers(0, 40, 2) + [0, 1]), *sorted(rng.integers(0, 50, 2) + [0, 1]))
        pred = rng.random((40, 50)) < 0.3
        samples.append((pred, gt, tuple(int(v) for v in rng.integers(0, [50, 40])), f"seq{i % 3}"))
    whole = SegmentationScores()
    shards = [SegmentationScores() for _ in range(3)]
    for i, (pred, gt, point, seq) in enumerate(samples):
        whole.add(pred, gt, point=point, sequence=seq)
        shards[i % 4 % 3].add(pred, gt, point=point, sequence=seq)  # sequences split across shards
    merged = SegmentationScores().merge(shards[0]).merge(shards[1]).merge(shards[2])
    a, b = whole.summary(), merged.summary()
    assert a.keys() == b.keys()
    assert (merged.inter, merged.union, merged.point_hits) == (whole.inter, whole.union, whole.point_hits)
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-12), k
    # averaging the shards' summaries would not give the same answer
    assert np.mean([sh.summary()["oiou"] for sh in shards]) != pytest.approx(a["oiou"], rel=1e-6)


def test_bad_input_fails_fast():
    s = SegmentationScores()
    m = np.zeros((4, 4), bool)
    with pytest.raises(ValueError, match="no samples"):
        s.summary()
    with pytest.raises(ValueError, match="shapes differ"):
        s.add(m, np.zeros((4, 5), bool))
    with pytest.raises(TypeError, match="must be boolean"):
        s.add(m.astype(np.uint8), m)
    with pytest.raises(ValueError, match="outside"):
        s.add(m, m, point=(4, 0))
    assert s.n == 0


def test_docstring_examples():
    assert doctest.testmod(metrics).failed == 0
