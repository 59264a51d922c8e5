"""A volume as slices: the one type every front door cuts images with (propagate, the server, few-shot, refine).

One axis rule: the slices run across the array axis whose direction cosine is closest to the named anatomical axis
(`geometry.slice_axis`), so an image stored sagittally still slices axially when asked to. In the plane, the
slices keep the image's storage order, unless `canonical`: then rows and columns are reordered and flipped to the
LPS orientation (what DICOMOrient would give), so that slices of differently stored volumes line up (few-shot).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmedsam2.settings import AXES


@dataclass(frozen=True)
class SliceGrid:
    """An image grid cut into slices: its geometry (SimpleITK's x, y, z order, LPS) and how its (z, y, x) voxel array
    becomes slice-first (n, h, w) planes and back."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    axis: str
    array_axis: int  # the numpy axis of the (z, y, x) array the slices run across
    plane_axes: tuple[int, int] = (-1, -1)  # canonical only: the numpy axes of the rows and the columns
    flips: tuple[bool, bool, bool] = (False, False, False)  # canonical only: slices, rows, columns reversed

    @classmethod
    def of(cls, image, axis: str = "axial", canonical: bool = False) -> "SliceGrid":
        """The grid of a SimpleITK image (or a reader: anything with its geometry getters) cut along `axis`."""
        from sslmedsam2.volume.geometry import slice_axis

        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}")
        direction = tuple(float(v) for v in image.GetDirection())
        array_axis = slice_axis(image, axis)
        plane_axes, flips = (-1, -1), (False, False, False)
        if canonical:
            cosines = np.asarray(direction).reshape(3, 3)
            physical = {a: int(np.argmax(np.abs(cosines[:, 2 - a]))) for a in range(3)}  # L=0, P=1, S=2
            rest = sorted((a for a in range(3) if a != array_axis), key=lambda a: -physical[a])
            plane_axes = (rest[0], rest[1])
            flips = tuple(bool(cosines[physical[a], 2 - a] < 0) for a in (array_axis, *rest))
        return cls(tuple(int(v) for v in image.GetSize()), tuple(float(v) for v in image.GetSpacing()),
                   tuple(float(v) for v in image.GetOrigin()), direction, axis, int(array_axis), plane_axes, flips)

    @property
    def canonical(self) -> bool:
        return self.plane_axes != (-1, -1)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, height, width)."""
        return tuple(self.to_slices(np.empty(self.size[::-1], dtype=np.bool_)).shape)

    def to_slices(self, array: np.ndarray) -> np.ndarray:
        """A (z, y, x) array on this grid as (n, h, w) slices: a view where the storage order allows."""
        if not self.canonical:
            return np.moveaxis(array, self.array_axis, 0)
        out = np.transpose(array, (self.array_axis, *self.plane_axes))
        return out[tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips)]

    def to_array(self, slices: np.ndarray) -> np.ndarray:
        """(n, h, w) slices back to the (z, y, x) array on this grid."""
        if not self.canonical:
            return np.moveaxis(slices, 0, self.array_axis)
        unflipped = slices[tuple(slice(None, None, -1) if flip else slice(None) for flip in self.flips)]
        return np.transpose(unflipped, np.argsort((self.array_axis, *self.plane_axes)))

    def to_image(self, slices: np.ndarray):
        """(n, h, w) slices as a SimpleITK image on this grid."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.to_array(slices)))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def describe(self) -> dict:
        """The grid as JSON (what a server tells its client)."""
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "axis": self.axis, "array_axis": self.array_axis}

    @classmethod
    def from_description(cls, info: dict) -> "SliceGrid":
        return cls(tuple(int(v) for v in info["size"]), tuple(float(v) for v in info["spacing"]),
                   tuple(float(v) for v in info["origin"]), tuple(float(v) for v in info["direction"]),
                   str(info["axis"]), int(info["array_axis"]))


@dataclass
class SliceVolume:
    """An image as 8-bit slices along an axis (what SAM2 reads), with the grid to put results back on; for a
    labelled volume (a few-shot support) its label map as slices too."""

    name: str
    grid: SliceGrid
    slices: np.ndarray | None  # (n, h, w) uint8; None where no frames are needed (interpolation, a server's work)
    labels: np.ndarray | None = None  # (n, h, w)
    path: Path | None = None

    @classmethod
    def from_image(cls, image, axis: str, intensity, name: str = "image", canonical: bool = False,
                   labels=None, path: Path | None = None) -> "SliceVolume":
        """Cut a float image (and its label map on the same grid) into slices, intensities mapped as asked (no
        frames when `intensity` is None)."""
        import SimpleITK as sitk

        grid = SliceGrid.of(image, axis, canonical)
        cut = None if labels is None else np.array(grid.to_slices(sitk.GetArrayViewFromImage(labels)), order="C")
        volume = cls(name, grid, None, cut, path)
        if intensity is not None:
            volume.make_frames(image, intensity)
        return volume

    def make_frames(self, image, intensity) -> None:
        """The 8-bit slices of `image` (on this grid), intensities mapped as asked."""
        import SimpleITK as sitk

        from sslmedsam2.frames import to_uint8

        self.slices = to_uint8(self.grid.to_slices(sitk.GetArrayViewFromImage(image)), intensity)  # no image copy

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    def to_image(self, slices: np.ndarray):
        return self.grid.to_image(slices)
