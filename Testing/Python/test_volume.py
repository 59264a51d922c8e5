"""Reading and writing keep the geometry exactly; grids are checked; the slice axis follows the direction."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import to_image

from sslmedsam2.errors import UserError
from sslmedsam2.volume import check_same_grid, read_image, read_label_map, slice_axis, write_image


def _oblique_direction() -> tuple[float, ...]:
    a, b = np.deg2rad(20), np.deg2rad(-35)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


@pytest.mark.parametrize("name", ["vol.nii.gz", "vol.nii", "vol.nrrd", "vol.mha", "dicom_series"])
def test_round_trip_keeps_geometry_and_values(tmp_path, name):
    labels = np.zeros((7, 12, 10), np.uint8)
    labels[2:5, 3:9, 2:7] = 1
    labels[4, 5:7, 6:8] = 3
    image = to_image(labels, spacing=(0.7, 1.3, 2.9), origin=(-12.5, 40.25, 7.0), direction=_oblique_direction())
    path = tmp_path / name
    write_image(image, path)
    back = read_label_map(path)
    tol = 1e-4 if name == "dicom_series" else 1e-6  # DICOM stores decimal strings
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=tol)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=tol)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=tol)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)
    check_same_grid(image, back)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_dicom_folder_is_read_as_float_image(tmp_path):
    array = (np.arange(5 * 6 * 4).reshape(5, 6, 4) * 3).astype(np.int16)
    write_image(to_image(array), tmp_path / "series")
    back = read_image(tmp_path / "series")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array.astype(np.float32))


def test_write_replaces_existing_output_atomically(tmp_path):
    path = tmp_path / "out.nii.gz"
    write_image(to_image(np.zeros((3, 4, 5), np.uint8)), path)
    write_image(to_image(np.ones((3, 4, 5), np.uint8)), path)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).min() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_images_written_side_by_side_are_each_complete_and_a_failure_is_raised(tmp_path):
    import os

    from sslmedsam2.errors import UserError
    from sslmedsam2.volume import write_images

    arrays = [np.full((6, 7, 8), value, np.float32) for value in range(5)]
    write_images([(to_image(a), tmp_path / f"map_{i}.nii.gz") for i, a in enumerate(arrays)])
    for i, a in enumerate(arrays):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"map_{i}.nii.gz"))), a)
    mask = os.umask(0o027)
    try:
        write_images([(to_image(a), tmp_path / f"again_{i}.nii.gz") for i, a in enumerate(arrays)])
        assert os.umask(0o027) == 0o027, "writing side by side changed the umask"
    finally:
        os.umask(mask)
    assert {(tmp_path / f"again_{i}.nii.gz").stat().st_mode & 0o777 for i in range(5)} == {0o640}
    with pytest.raises(UserError, match="missing"):
        write_images([(to_image(arrays[0]), tmp_path / "fine.nii.gz"),
                      (to_image(arrays[1]), tmp_path / "missing" / "map.nii.gz")])
    assert (tmp_path / "fine.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "tmp" in p.name) == []


def test_axial_axis_is_numpy_axis_0_for_identity_direction():
    image = to_image(np.zeros((5, 6, 7), np.float32))
    assert slice_axis(image, "axial") == 0
    assert slice_axis(image, "coronal") == 1
    assert slice_axis(image, "sagittal") == 2


def test_axis_follows_direction_cosines_not_storage_order():
    # stored sagittally: index i runs along S (axial normal), index k runs along L (x)
    direction = (0, 0, 1,
                 0, 1, 0,
                 1, 0, 0)
    image = to_image(np.zeros((5, 6, 7), np.float32), direction=direction)
    assert slice_axis(image, "axial") == 2  # numpy axis 2 is index i
    assert slice_axis(image, "sagittal") == 0
    assert slice_axis(image, "coronal") == 1


def test_axis_of_oblique_image_is_the_closest_one():
    image = to_image(np.zeros((5, 6, 7), np.float32), direction=_oblique_direction())
    assert {slice_axis(image, a) for a in ("axial", "coronal", "sagittal")} == {0, 1, 2}


@pytest.mark.parametrize("change, message", [
    (lambda im: to_image(np.zeros((5, 6, 8), np.uint8)), "size"),
    (lambda im: to_image(np.zeros((5, 6, 7), np.uint8), spacing=(0.8, 0.9, 3.0)), "spacing"),
    (lambda im: to_image(np.zeros((5, 6, 7), np.uint8), origin=(-10.0, 21.0, 5.0)), "origin"),
    (lambda im: to_image(np.zeros((5, 6, 7), np.uint8), direction=_oblique_direction()), "direction"),
])
def test_label_map_on_another_grid_is_refused(change, message):
    image = to_image(np.zeros((5, 6, 7), np.float32))
    with pytest.raises(UserError, match=message):
        check_same_grid(image, change(image))


def test_tiny_float_noise_in_geometry_is_accepted():
    image = to_image(np.zeros((5, 6, 7), np.float32))
    other = to_image(np.zeros((5, 6, 7), np.uint8), spacing=(0.8000001, 0.9, 2.5), origin=(-10.00001, 20.0, 5.0))
    check_same_grid(image, other)


def test_float_label_values_must_be_whole(tmp_path):
    sitk.WriteImage(to_image(np.full((3, 4, 5), 1.5, np.float32)), str(tmp_path / "bad.nii.gz"))
    with pytest.raises(UserError, match="non-integer"):
        read_label_map(tmp_path / "bad.nii.gz")
    sitk.WriteImage(to_image(np.full((3, 4, 5), 2.0, np.float32)), str(tmp_path / "ok.nii.gz"))
    assert read_label_map(tmp_path / "ok.nii.gz").GetPixelID() == sitk.sitkUInt8


def test_a_label_beyond_uint16_is_refused_not_wrapped_into_another(tmp_path):
    labels = np.zeros((3, 4, 5), np.int32)
    labels[0, 0, 0], labels[1, 1, 1] = 1, 65537  # as uint16, 65537 would become label 1
    sitk.WriteImage(to_image(labels), str(tmp_path / "big.nii.gz"))
    with pytest.raises(UserError, match="label 65537, above 65535"):
        read_label_map(tmp_path / "big.nii.gz")
    labels[1, 1, 1] = 65535
    sitk.WriteImage(to_image(labels), str(tmp_path / "top.nii.gz"))
    assert sitk.GetArrayFromImage(read_label_map(tmp_path / "top.nii.gz")).max() == 65535


@pytest.mark.parametrize("name", ["OUT.NII.GZ", "out.Nii.Gz", "OUT.NII"])
def test_an_upper_case_nifti_output_is_refused_before_the_work(tmp_path, name):
    from sslmedsam2.volume.io import check_output

    with pytest.raises(UserError, match="lower-case suffix"):
        check_output(tmp_path / name)
    check_output(tmp_path / "OUT.NRRD")  # ITK writes these whatever their case


def test_a_gzip_bomb_is_refused_after_little_more_than_its_header_declares(tmp_path, monkeypatch):
    """A small .nii.gz that inflates to far more than its header declares (a server upload, a damaged file) is
    refused before it fills the memory; a file as declared is read as before."""
    import gzip

    from sslmedsam2.volume import inflate

    source = tmp_path / "small.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)), str(source))
    declared = source.read_bytes()
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(gzip.compress(declared + bytes(64 << 20), compresslevel=1))
    inflated = []
    pieces = inflate._gzip_pieces
    monkeypatch.setattr(inflate, "_gzip_pieces", lambda raw: (inflated.append(len(p)) or p for p in pieces(raw)))
    with pytest.raises(UserError, match="decompresses to more than its header declares"):
        read_image(bomb)
    assert sum(inflated) <= len(declared) + 2 * inflate._PIECE  # stopped early, not after 64 MB
    whole = tmp_path / "whole.nii.gz"
    whole.write_bytes(gzip.compress(declared))
    assert sitk.GetArrayFromImage(read_image(whole)).sum() == np.arange(120).sum()
