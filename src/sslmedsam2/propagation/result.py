"""What every propagation method returns, and how it reports progress (no torch needed here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sslmedsam2.propagation.confidence import SliceConfidence


class Cancelled(Exception):
    """A run stopped at a safe point because it was asked to; nothing was written."""


class Progress(Protocol):
    """A tqdm instance fits."""

    def reset(self, total: int | None = None) -> object: ...
    def update(self, n: int = 1) -> object: ...


@dataclass
class Propagation:
    """Result in slice-first order: the label map (n, h, w) and one confidence row per slice and label."""

    labels: np.ndarray
    confidence: list[SliceConfidence]
