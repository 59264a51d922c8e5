"""Files other tools wrote (nibabel's and pydicom's own test data, and files made with those libraries) are read
right, compared with nibabel and pydicom as references, or refused with the reason."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from bad_inputs import dicom_series, even_positions

from sslmedsam2.errors import UserError
from sslmedsam2.volume import read_image
from sslmedsam2.volume.geometry import GeometryWarning

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
LPS = np.diag([-1.0, -1.0, 1.0])


def _reference_geometry(affine: np.ndarray):
    """nibabel's affine (RAS) as SimpleITK's spacing, origin and direction (LPS)."""
    matrix = LPS @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    return spacing, LPS @ affine[:3, 3], (matrix / spacing).ravel()


def _check_against_nibabel(path: Path, image: sitk.Image) -> None:
    reference = nib.load(str(path))
    spacing, origin, direction = _reference_geometry(reference.affine)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-5)
    voxels = np.asarray(reference.dataobj, dtype=np.float64).reshape(reference.shape[:3], order="F")
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), voxels.transpose(2, 1, 0), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("name", ["anatomical.nii", "reoriented_anat_moved.nii", "standard.nii.gz"])
def test_nibabel_test_volumes_read_as_nibabel_reads_them(name):
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"{name} is not in this nibabel")
    _check_against_nibabel(path, read_image(path))


@pytest.mark.parametrize("name, fragment", [
    ("functional.nii", "4D"), ("example4d.nii.gz", "4D"), ("example_nifti2.nii.gz", "4D"),
    ("row_major.dconn.nii", "6D"), ("analyze.hdr", "Analyze"), ("resampled_anat_moved.nii", "NaN"),
])
def test_nibabel_test_files_that_are_no_3d_volume_are_refused_with_the_reason(name, fragment):
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"{name} is not in this nibabel")
    with pytest.raises(UserError, match=fragment):
        read_image(path)


def _volume() -> np.ndarray:
    return (np.arange(5 * 6 * 7).reshape(5, 6, 7) * 3 - 20).astype(np.int16)


def _oblique_affine(zooms=(0.8, 1.1, 2.5), origin=(12.0, -30.5, 7.25)) -> np.ndarray:
    a = np.deg2rad(17)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms)
    affine[:3, 3] = origin
    return affine


@pytest.mark.parametrize("kind", ["nifti1 with extension", "nifti2", "nifti2 with extension", "big endian",
                                  "pair", "pair gz", "scaled", "sform only", "qform only", "no transform"])
def test_nifti_variants_read_as_nibabel_reads_them(tmp_path, kind):
    data = _volume()
    affine = _oblique_affine()
    cls = nib.Nifti2Image if kind.startswith("nifti2") else nib.Nifti1Pair if kind.startswith("pair") else nib.Nifti1Image
    image = cls(data, affine)
    if "extension" in kind:
        image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment from another tool" * 40))
    if kind == "big endian":
        image = nib.Nifti1Image(data.astype(">i2"), affine, nib.Nifti1Header(endianness=">"))
    if kind == "scaled":
        image.header.set_slope_inter(0.5, -3.0)
    if kind == "sform only":
        image.header.set_qform(None, code=0)
        image.header["pixdim"][1:4] = [9.0, 9.0, 9.0]  # pixdim out of step: the sform holds the truth
    if kind == "qform only":
        image.header.set_sform(None, code=0)
    if kind == "no transform":
        image = nib.Nifti1Image(data, None)
        image.header.set_zooms((0.8, 1.1, 2.5))
    suffix = {"pair": ".img", "pair gz": ".img.gz"}.get(kind, ".nii")
    path = tmp_path / f"volume{suffix}"
    nib.save(image, str(path))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        read = read_image(path.with_suffix(".hdr") if kind == "pair" else path)
    assert bool(said) == (kind == "no transform"), [str(w.message) for w in said]
    if kind == "no transform":  # as ITK reads it: pixdim alone, at the origin, no rotation; said as a warning
        np.testing.assert_allclose(read.GetSpacing(), image.header.get_zooms()[:3], atol=1e-6)
        assert read.GetOrigin() == (0.0, 0.0, 0.0) and read.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), data.transpose(2, 1, 0))
        return
    _check_against_nibabel(path, read)


def test_disagreeing_sform_and_qform_use_the_sform_and_say_so(tmp_path):
    image = nib.Nifti1Image(_volume(), _oblique_affine())
    image.header.set_qform(_oblique_affine(origin=(0.0, 0.0, 0.0)), code=1)
    path = tmp_path / "disagree.nii.gz"
    nib.save(image, str(path))
    with pytest.warns(GeometryWarning, match="sform and qform differ"):
        read = read_image(path)
    np.testing.assert_allclose(read.GetOrigin(), LPS @ np.array([12.0, -30.5, 7.25]), atol=1e-4)


def test_a_sheared_sform_is_kept_not_replaced_by_the_qform(tmp_path):
    affine = _oblique_affine()
    affine[0, 2] += 0.4  # shear
    image = nib.Nifti1Image(_volume(), affine)
    path = tmp_path / "sheared.nii"
    nib.save(image, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        _check_against_nibabel(path, read_image(path))


# --- DICOM ------------------------------------------------------------------------------------------------------
def _pydicom_volume(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(voxels z, y, x after rescale, first position, spacing x, y, z) of a series folder, as pydicom reads it."""
    slices = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    normal = np.cross(*np.asarray(slices[0].ImageOrientationPatient, float).reshape(2, 3))
    slices.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ normal))
    voxels = np.stack([ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
                       for ds in slices])
    positions = np.asarray([ds.ImagePositionPatient for ds in slices], float)
    step = np.linalg.norm(positions[1] - positions[0])
    spacing = [float(v) for v in slices[0].PixelSpacing][::-1] + [step]
    return voxels, positions[0], np.asarray(spacing)


@pytest.mark.parametrize("variant", ["plain", "reversed instances", "fractional rescale varies", "monochrome1",
                                     "monochrome1 unsigned", "junk files beside"])
def test_dicom_series_read_as_pydicom_reads_them(tmp_path, variant):
    positions = even_positions()[::-1] if variant == "reversed instances" else even_positions()

    def change(k, ds):
        if variant == "fractional rescale varies":
            ds.RescaleSlope, ds.RescaleIntercept = (1, -1024) if k < 3 else (0.5, -1024.25)
        if variant.startswith("monochrome1"):
            ds.PhotometricInterpretation = "MONOCHROME1"
        if variant == "monochrome1 unsigned":
            ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
            ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) & 0x0FFF).astype(np.uint16).tobytes()

    folder = dicom_series(tmp_path, positions, change=change)
    if variant == "junk files beside":
        (folder / "README.txt").write_text("notes")
        (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" + bytes(100))
    voxels, origin, spacing = _pydicom_volume(folder)
    read = read_image(folder)
    np.testing.assert_allclose(sitk.GetArrayFromImage(read), voxels, atol=1e-3)
    np.testing.assert_allclose(read.GetOrigin(), origin, atol=1e-3)
    np.testing.assert_allclose(read.GetSpacing(), spacing, atol=1e-4)


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm"])
def test_dicom_transfer_syntaxes_read_as_pydicom_reads_them(tmp_path, name):
    try:
        source = pydicom.dcmread(get_testdata_file(name))
    except Exception:
        pytest.skip(f"{name} is not in this pydicom")
    folder = tmp_path / "series"
    folder.mkdir()
    normal = np.cross(*np.asarray(source.ImageOrientationPatient, float).reshape(2, 3))
    for k in range(3):
        ds = copy.deepcopy(source)
        ds.SOPInstanceUID = f"{source.SOPInstanceUID}.{k + 1}"
        ds.ImagePositionPatient = list(np.asarray(source.ImagePositionPatient, float) + 3.0 * k * normal)
        ds.save_as(folder / f"s{k}.dcm")
    expected = source.pixel_array * float(source.get("RescaleSlope", 1)) + float(source.get("RescaleIntercept", 0))
    read = sitk.GetArrayFromImage(read_image(folder))
    for k in range(3):
        np.testing.assert_allclose(read[k], expected, atol=1e-3)


def test_rt_dose_is_scaled_to_gray(tmp_path):
    path = tmp_path / "dose.dcm"
    shutil.copy(get_testdata_file("rtdose.dcm"), path)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.DoseGridScaling)
    read = sitk.GetArrayFromImage(read_image(path))
    np.testing.assert_allclose(read, expected, rtol=1e-6)


@pytest.mark.parametrize("name, fragment", [("rtdose_expb.dcm", "big-endian"), ("liver_1frame.dcm", "SEG"),
                                            ("CT_small.dcm", "single DICOM slice"), ("rtplan.dcm", "pixel data")])
def test_dicom_files_that_are_no_volume_are_refused_with_the_reason(tmp_path, name, fragment):
    try:
        source = get_testdata_file(name)
    except Exception:
        source = None
    if source is None:
        pytest.skip(f"{name} is not in this pydicom")
    path = tmp_path / name
    shutil.copy(source, path)
    with pytest.raises(UserError, match=fragment):
        read_image(path)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(source, folder / name)
    with pytest.raises(UserError, match=fragment):
        read_image(folder)


@pytest.mark.parametrize("folder, fragment", [("98892001/CT2N", "orientations"), ("98892003/MR700", "orientations"),
                                              ("77654033/CT2", "slices are")])
def test_real_series_of_other_tools_that_make_no_volume_are_refused(tmp_path, folder, fragment):
    root = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / folder
    if not root.is_dir():
        pytest.skip(f"{folder} is not in this pydicom")
    with pytest.raises(UserError, match=fragment):
        read_image(shutil.copytree(root, tmp_path / "series"))
