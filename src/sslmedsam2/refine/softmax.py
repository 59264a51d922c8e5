"""nnU-Net's softmax -> the per-slice, per-label confidence table that `propagate` writes (torch-free).

presence: the label's highest probability on the slice (the chance that it is there at all);
certainty: `slice_certainty` of the label's probabilities on the slice (mean |2p - 1| where p > 0.05);
agreement: not used (one prediction); confidence: presence (its complement where the label is absent from the
label map) x certainty. source: "nnunet".
"""

from __future__ import annotations

import math

import numpy as np

from sslmedsam2.labelmap.confidence import SliceConfidence, slice_certainty

SOURCE = "nnunet"


def softmax_confidence(labels: np.ndarray, probabilities: dict[int, np.ndarray],
                       source: str = SOURCE) -> list[SliceConfidence]:
    """labels: slice-first label map (n, h, w); probabilities: per label value, its softmax channel, slice-first."""
    n = len(labels)
    rows = []
    for label, prob in sorted(probabilities.items()):
        if prob.shape != labels.shape:
            raise ValueError(f"label {label}: probabilities of shape {prob.shape} for a label map of {labels.shape}")
        presence = prob.reshape(n, -1).max(axis=1)
        certainty = slice_certainty(prob)
        voxels = (labels == label).sum(axis=(1, 2))
        for z in range(n):
            p, c, v = float(presence[z]), float(certainty[z]), int(voxels[z])
            rows.append(SliceConfidence(z, int(label), source, v > 0, v, p, c, math.nan, (p if v else 1.0 - p) * c))
    return rows
