"""Referring-segmentation scores, accumulated so that shards combine exactly.

- mIoU: mean over samples of each sample's IoU.
- oIoU: cumulative intersection / cumulative union over the dataset (large
  objects weigh more); the number RefAM and most RefCOCO papers report.
- point accuracy: fraction of samples whose predicted peak point lies in the
  target mask.
- J&F (video, DAVIS): J = region IoU, F = boundary F-measure with a tolerance of
  0.008 x the image diagonal (DAVIS's `bound_th`); each averaged over the frames
  of a sequence (an object track), then over sequences; J&F = (J + F) / 2.

`SegmentationScores` keeps only sums and counts, so `merge` of per-process
accumulators gives exactly what one process over all samples would.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import cv2
import numpy as np
from skimage.morphology import disk

from vlmtools.masks import check_masks, iou, overlap

__all__ = ["BOUND_TH", "SegmentationScores", "boundary_f", "iou"]

BOUND_TH = 0.008  # DAVIS boundary tolerance, as a fraction of the image diagonal


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """DAVIS boundary F-measure of two boolean masks (`db_eval_boundary`).

    Boundary pixels match when within `bound_th` x diagonal pixels (or
    `bound_th` pixels when >= 1) of the other mask's boundary.

        >>> a = np.zeros((20, 20), bool); a[5:15, 5:15] = True
        >>> b = np.zeros((20, 20), bool); b[6:15, 5:15] = True   # top edge 1 px lower
        >>> c = np.zeros((20, 20), bool); c[:3, :3] = True       # far away
        >>> boundary_f(a, a), boundary_f(a, b), boundary_f(a, c)
        (1.0, 1.0, 0.0)
    """
    pred, gt = check_masks(pred, gt)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    kernel = disk(radius).astype(np.uint8)
    pb, gb = _boundary(pred), _boundary(gt)
    n_p, n_g = int(pb.sum()), int(gb.sum())
    if n_p == 0 or n_g == 0:  # DAVIS: both empty -> 1; one empty -> P or R is 0
        return 1.0 if n_p == n_g else 0.0
    precision = (pb & cv2.dilate(gb.astype(np.uint8), kernel).astype(bool)).sum() / n_p
    recall = (gb & cv2.dilate(pb.astype(np.uint8), kernel).astype(bool)).sum() / n_g
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def _boundary(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a mask, as DAVIS's `seg2bmap` draws it at full size."""
    e, s, se = (np.zeros_like(mask) for _ in range(3))
    e[:, :-1], s[:-1, :], se[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    b = (mask ^ e) | (mask ^ s) | (mask ^ se)
    b[-1, :] = mask[-1, :] ^ e[-1, :]
    b[:, -1] = mask[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


class SegmentationScores:
    """Accumulates mIoU, oIoU, point accuracy and J&F over a dataset.

        >>> scores = SegmentationScores()
        >>> gt = np.zeros((4, 4), bool); gt[:2] = True
        >>> scores.add(gt, gt, point=(3, 0)); scores.add(~gt, gt, point=(0, 3))
        >>> s = scores.summary(); s["miou"], s["oiou"], s["point_acc"]
        (0.5, 0.3333333333333333, 0.5)

    Pass `sequence=` (e.g. "video/object") to count a frame towards J&F; frames
    of one sequence may be added by different processes and merged.
    """

    def __init__(self) -> None:
        self.n = 0
        self.iou_sum = 0.0
        self.inter = 0
        self.union = 0
        self.points = 0
        self.point_hits = 0
        self.sequences: dict[Hashable, list[float]] = {}  # name -> [frames, J sum, F sum]

    def add(
        self,
        pred_mask: np.ndarray,
        gt_mask: np.ndarray,
        point: tuple[int, int] | None = None,
        sequence: Hashable | None = None,
    ) -> None:
        """Score one sample: boolean (H, W) masks, `point` as (x, y) pixel coordinates."""
        pred, gt = check_masks(pred_mask, gt_mask)
        if point is not None and not (0 <= point[0] < gt.shape[1] and 0 <= point[1] < gt.shape[0]):
            raise ValueError(f"point (x, y) = {point} lies outside the {gt.shape[1]}x{gt.shape[0]} mask")
        sample_iou, inter, union = overlap(pred, gt)
        self.n += 1
        self.iou_sum += sample_iou
        self.inter += inter
        self.union += union
        if point is not None:
            x, y = point
            self.points += 1
            self.point_hits += bool(gt[y, x])
        if sequence is not None:
            seq = self.sequences.setdefault(sequence, [0, 0.0, 0.0])
            seq[0] += 1
            seq[1] += sample_iou
            seq[2] += boundary_f(pred, gt)

    def merge(self, other: SegmentationScores) -> SegmentationScores:
        """Add `other`'s samples into this accumulator (in place) and return it."""
        self.n += other.n
        self.iou_sum += other.iou_sum
        self.inter += other.inter
        self.union += other.union
        self.points += other.points
        self.point_hits += other.point_hits
        for name, (frames, j, f) in other.sequences.items():
            seq = self.sequences.setdefault(name, [0, 0.0, 0.0])
            seq[0] += frames
            seq[1] += j
            seq[2] += f
        return self

    def summary(self) -> dict[str, float]:
        """The scores so far; point accuracy and J&F only when points or sequences were added."""
        if self.n == 0:
            raise ValueError("no samples added")
        out: dict[str, float] = {
            "n": self.n,
            "miou": self.iou_sum / self.n,
            "oiou": self.inter / self.union if self.union else 1.0,
        }
        if self.points:
            out["point_acc"] = self.point_hits / self.points
            out["n_points"] = self.points
        if self.sequences:
            per_seq = [(j / n, f / n) for n, j, f in self.sequences.values()]
            out["J"] = sum(j for j, _ in per_seq) / len(per_seq)
            out["F"] = sum(f for _, f in per_seq) / len(per_seq)
            out["J&F"] = (out["J"] + out["F"]) / 2
            out["n_sequences"] = len(per_seq)
        return out
