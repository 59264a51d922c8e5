"""Seeds: the slices a user drew, per label, and the rule that drawn slices come back exactly as drawn."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


def slices_with(labels_map: np.ndarray, label: int) -> list[int]:
    """The slices of a slice-first label map (n, h, w) on which `label` has voxels."""
    return [int(z) for z in np.flatnonzero((labels_map == label).any(axis=(1, 2)))]


def drawn_slices(labels_map: np.ndarray) -> dict[int, list[int]]:
    """Each label of a slice-first label map (n, h, w) with the slices it has voxels on, in label order. Only
    slices holding a label are searched: a drawing has a few, and a search of all 300 slices of a 512 x 512 volume
    (np.unique) takes a quarter of a second."""
    labelled = np.flatnonzero(labels_map.reshape(len(labels_map), -1).any(axis=1))
    found: dict[int, list[int]] = {}
    for z in labelled:
        plane = labels_map[z]
        if plane.dtype.kind == "u":  # counting is linear; np.unique sorts
            values = np.flatnonzero(np.bincount(plane.ravel()))
        else:
            values = np.unique(plane)
        for value in values:
            if value:
                found.setdefault(int(value), []).append(int(z))
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class Seeds:
    """A label map in slice-first order (n, h, w) of which only the drawn slices matter.

    A slice is a seed of label L when L has voxels on it: labels are seeded independently, so drawing the liver
    on one slice says nothing about the kidney there.
    """

    labels_map: np.ndarray
    allow_empty: bool = field(default=False, repr=False, compare=False)  # for a caller that reports it itself

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
        if not self.allow_empty and not self.labels:
            raise ValueError("seeds without any labelled voxel")

    @cached_property
    def _drawn(self) -> dict[int, list[int]]:  # the map is not changed after construction
        return drawn_slices(self.labels_map)

    @property
    def labels(self) -> list[int]:
        return list(self._drawn)

    def slices_of(self, label: int) -> list[int]:
        return list(self._drawn.get(label, []))

    def seed_slices(self) -> dict[int, list[int]]:
        return {label: list(slices) for label, slices in self._drawn.items()}

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
