"""Intensity normalisation to 8 bits, per modality, as SAM2 saw its training images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sslmedsam2.errors import UserError

# (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft-tissue": (40.0, 400.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


@dataclass(frozen=True)
class IntensitySpec:
    """How to map voxel values to 0..255.

    mri: clip to the [low, high] percentiles of the non-zero voxels (reference: 0.5 / 99.5), zeros stay zero;
    ct: a named window (default soft tissue); range: explicit minimum and maximum.
    """

    modality: str = "mri"
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: str = "soft-tissue"
    value_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.value_range is not None:
            low, high = self.value_range
            if not high > low:
                raise UserError(f"intensity range {low}..{high}: the maximum must be above the minimum")
        elif self.modality == "ct":
            if self.window not in CT_WINDOWS:
                raise UserError(f"unknown CT window {self.window!r}; choose one of {', '.join(CT_WINDOWS)}")
        elif self.modality != "mri":
            raise UserError(f"unknown modality {self.modality!r}; choose mri or ct")

    def bounds(self, volume: np.ndarray) -> tuple[float, float]:
        if self.value_range is not None:
            return self.value_range
        if self.modality == "ct":
            level, width = CT_WINDOWS[self.window]
            return level - width / 2, level + width / 2
        nonzero = volume[volume != 0]
        if nonzero.size == 0:
            return 0.0, 1.0
        low, high = np.percentile(nonzero, self.percentiles)
        return float(low), float(high)


def to_uint8(volume: np.ndarray, spec: IntensitySpec) -> np.ndarray:
    """Rescale to uint8 (a quarter of float32's memory; SAM2's own frames are 8-bit JPEGs)."""
    low, high = spec.bounds(volume)
    scale = 255.0 / (high - low) if high > low else 0.0
    out = np.clip((volume.astype(np.float32) - low) * scale, 0, 255)
    if spec.modality == "mri" and spec.value_range is None:
        out[volume == 0] = 0
    return np.rint(out).astype(np.uint8)
