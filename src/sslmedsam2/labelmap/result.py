"""What every propagation method returns, and how it reports progress (no torch needed here)."""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from sslmedsam2.labelmap.confidence import SliceConfidence


@dataclass
class Propagation:
    """Result in slice-first order: the label map (n, h, w) and one confidence row per slice and label."""

    labels: np.ndarray
    confidence: list[SliceConfidence]
