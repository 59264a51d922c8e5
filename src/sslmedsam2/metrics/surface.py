"""Dice, 95th-percentile Hausdorff distance and average symmetric surface distance, in mm.

Conventions as MedPy's: HD95 is the larger of the two directed 95th percentiles of surface-to-surface distances;
ASSD the mean of the two directed mean distances; surfaces are voxels with a 26-neighbour outside the mask.
Empty against empty: Dice 1, distances 0. Empty against non-empty: Dice 0, distances NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class LabelScores:
    label: int
    dice: float
    hd95: float
    assd: float


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3,) * mask.ndim, bool), border_value=0)


def _directed_distances(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distances from each surface voxel of a to the nearest surface voxel of b."""
    to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing)
    return to_b[_surface(a)]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; two empty masks agree fully."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def mean_dice(a: np.ndarray, b: np.ndarray, labels: list[int]) -> float:
    """Mean over `labels` present in either map of their Dice (1 when no label is present in either)."""
    present = [label for label in labels if (a == label).any() or (b == label).any()]
    return float(np.mean([dice(a == label, b == label) for label in present])) if present else 1.0


def score_mask(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float, float]:
    p_sum, t_sum = int(pred.sum()), int(truth.sum())
    if p_sum == 0 and t_sum == 0:
        return 1.0, 0.0, 0.0
    dice_value = dice(pred, truth)
    if p_sum == 0 or t_sum == 0:
        return dice_value, math.nan, math.nan
    d_pt = _directed_distances(pred, truth, spacing)
    d_tp = _directed_distances(truth, pred, spacing)
    hd95 = max(float(np.percentile(d_pt, 95)), float(np.percentile(d_tp, 95)))
    assd = (float(d_pt.mean()) + float(d_tp.mean())) / 2
    return dice_value, hd95, assd


def score_labels(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...],
                 labels: list[int] | None = None) -> list[LabelScores]:
    """Scores per label (default: every non-zero label in either map); arrays and spacing in the same axis order."""
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(pred), np.unique(truth)) if v != 0)
    return [LabelScores(label, *score_mask(pred == label, truth == label, spacing)) for label in labels]
