"""Grid comparison and the choice of slice axis from the direction cosines."""

from __future__ import annotations

from enum import Enum

import numpy as np
import SimpleITK as sitk

from sslmedsam2.errors import UserError


class GeometryWarning(UserWarning):
    """A file's geometry is ambiguous or irregular; the reader says which reading it chose."""


class SliceAxis(str, Enum):
    """Anatomical slicing planes; the value is the physical (LPS) axis the slices are stacked along."""

    AXIAL = "axial"
    CORONAL = "coronal"
    SAGITTAL = "sagittal"

    @property
    def physical_axis(self) -> int:
        return {"sagittal": 0, "coronal": 1, "axial": 2}[self.value]


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """Columns are the physical directions of the index axes i, j, k."""
    return np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)


def slice_axis(image: sitk.Image, axis: SliceAxis | str) -> int:
    """The numpy axis (of GetArrayFromImage's z, y, x order) whose index runs across `axis` slices.

    Chosen by the direction cosines, so an image stored sagittally still slices axially when asked to.
    """
    axis = SliceAxis(axis)
    cosines = np.abs(direction_matrix(image))
    index_axis = int(np.argmax(cosines[axis.physical_axis]))
    return 2 - index_axis


def check_same_grid(image: sitk.Image, other: sitk.Image, what: str = "label map", rel_tol: float = 1e-3) -> None:
    """Refuse `other` unless it lies on `image`'s voxel grid (tolerance: a thousandth of a voxel, 1e-4 in cosines)."""
    if image.GetSize() != other.GetSize():
        raise UserError(f"{what} size {other.GetSize()} differs from the image size {image.GetSize()}; resample it onto the image first")
    spacing = np.asarray(image.GetSpacing())
    if not np.allclose(other.GetSpacing(), spacing, rtol=rel_tol, atol=0):
        raise UserError(f"{what} spacing {other.GetSpacing()} differs from the image spacing {image.GetSpacing()}")
    if not np.allclose(other.GetOrigin(), image.GetOrigin(), rtol=0, atol=rel_tol * spacing.min()):
        raise UserError(f"{what} origin {tuple(round(v, 4) for v in other.GetOrigin())} differs from the image origin "
                        f"{tuple(round(v, 4) for v in image.GetOrigin())}; it is not on the image grid")
    if not np.allclose(other.GetDirection(), image.GetDirection(), rtol=0, atol=1e-4):
        raise UserError(f"{what} direction differs from the image direction; it is not on the image grid")
