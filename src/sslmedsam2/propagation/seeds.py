"""Seeds: the slices a user drew, per label, and the rule that drawn slices come back exactly as drawn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def slices_with(labels_map: np.ndarray, label: int) -> list[int]:
    """The slices of a slice-first label map (n, h, w) on which `label` has voxels."""
    return [int(z) for z in np.flatnonzero((labels_map == label).any(axis=(1, 2)))]


@dataclass(frozen=True)
class Seeds:
    """A label map in slice-first order (n, h, w) of which only the drawn slices matter.

    A slice is a seed of label L when L has voxels on it: labels are seeded independently, so drawing the liver
    on one slice says nothing about the kidney there.
    """

    labels_map: np.ndarray

    @classmethod
    def every_nth_slice(cls, reference: np.ndarray, step: int) -> "Seeds":
        """Simulate a user who draws every `step`-th slice of each label's extent, its last slice included."""
        seeds = np.zeros_like(reference)
        for label in (int(v) for v in np.unique(reference) if v != 0):
            present = slices_with(reference, label)
            for z in sorted(set(range(present[0], present[-1] + 1, step)) | {present[-1]}):
                seeds[z][reference[z] == label] = label
        return cls(seeds)

    def __post_init__(self) -> None:
        if not self.labels:
            raise ValueError("seeds without any labelled voxel")

    @property
    def labels(self) -> list[int]:
        return [int(v) for v in np.unique(self.labels_map) if v != 0]

    def slices_of(self, label: int) -> list[int]:
        return slices_with(self.labels_map, label)

    def seed_slices(self) -> dict[int, list[int]]:
        return {label: self.slices_of(label) for label in self.labels}

    def impose(self, result: np.ndarray) -> np.ndarray:
        """Return `result` with every (slice, label) seed restored exactly as drawn."""
        out = result.copy()
        for label, slices in self.seed_slices().items():
            for z in slices:
                drawn = self.labels_map[z] == label
                plane = out[z]
                plane[(plane == label) & ~drawn] = 0
                plane[drawn] = label
        return out
