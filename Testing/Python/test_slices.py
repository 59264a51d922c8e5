"""The one volume-as-slices type: one axis rule, the canonical in-plane orientation equal to DICOMOrient's, and
slices back onto the image grid exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from sslmedsam2.volume import slice_axis
from sslmedsam2.volume.slices import SliceGrid, SliceVolume

_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


def _oriented(permutation, signs) -> sitk.Image:
    direction = np.zeros((3, 3))
    for index, (physical, sign) in enumerate(zip(permutation, signs)):
        direction[physical, index] = sign
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetDirection(tuple(direction.ravel()))
    image.SetSpacing((0.5, 0.7, 2.0))
    image.SetOrigin((3.0, -4.0, 5.0))
    return image


@pytest.mark.parametrize("permutation", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("signs", list(itertools.product((1, -1), repeat=3)))
def test_every_orientation_cuts_as_the_axis_rule_says_and_back_exactly(permutation, signs):
    image = _oriented(permutation, signs)
    array = sitk.GetArrayFromImage(image)
    for axis, lps_axis in _AXES.items():
        plain, canonical = SliceGrid.of(image, axis), SliceGrid.of(image, axis, canonical=True)
        np.testing.assert_array_equal(plain.to_slices(array), np.moveaxis(array, slice_axis(image, axis), 0))
        reference = np.moveaxis(sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS")), lps_axis, 0)
        np.testing.assert_array_equal(canonical.to_slices(array), reference)  # as few-shot always cut its volumes
        for grid in (plain, canonical):
            np.testing.assert_array_equal(grid.to_array(grid.to_slices(array)), array)
            back = grid.to_image(grid.to_slices(array))
            assert back.GetSize() == image.GetSize() and back.GetDirection() == image.GetDirection()
            assert back.GetOrigin() == image.GetOrigin() and back.GetSpacing() == image.GetSpacing()
            assert grid.shape == grid.to_slices(array).shape


def test_a_grid_travels_as_json():
    grid = SliceGrid.of(_oriented((1, 0, 2), (1, -1, 1)), "coronal")
    assert SliceGrid.from_description(grid.describe()) == grid


def test_a_volume_keeps_its_labels_after_the_image_is_gone():
    """The label slices are a copy, never a view into a SimpleITK image that may be freed."""
    image = _oriented((0, 1, 2), (1, 1, 1))
    labels = sitk.Cast(image > 60, sitk.sitkUInt8)
    volume = SliceVolume.from_image(sitk.Cast(image, sitk.sitkFloat32), "axial", None, labels=labels)
    expected = sitk.GetArrayFromImage(labels)
    del image, labels
    sitk.GetImageFromArray(np.full((40, 50, 60), 7, np.uint8))  # reuses freed memory if the slices were a view
    np.testing.assert_array_equal(volume.labels, expected)
    assert volume.slices is None and volume.shape == (4, 5, 6)
