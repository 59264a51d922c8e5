"""Read and write NIfTI, NRRD, MHA and DICOM series through SimpleITK, keeping the physical geometry."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import atomic_dir, atomic_path, full_suffix
from sslmedsam2.errors import UserError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
# Label maps up to this many labels are written as uint8, beyond as uint16.
_UINT8_MAX_LABEL = 255


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise UserError(f"{folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise UserError(f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series)}); give one series per folder")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def read_volume(path: Path | str) -> sitk.Image:
    """Read a 3D image file or DICOM series folder; anything else is a UserError naming the file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "unreadable")
        raise UserError(f"{path}: not a readable image ({first.strip()[:160]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UserError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar 3D image is needed")
    if image.GetDimension() != 3:
        raise UserError(f"{path}: is {image.GetDimension()}D; a 3D volume is needed")
    if min(image.GetSize()) < 1:
        raise UserError(f"{path}: empty image of size {image.GetSize()}")
    return image


def read_image(path: Path | str) -> sitk.Image:
    """Read an intensity volume as float32, refusing NaN or infinite voxels."""
    image = sitk.Cast(read_volume(path), sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise UserError(f"{path}: {bad} voxels are NaN or infinite")
    return image


def read_label_map(path: Path | str) -> sitk.Image:
    """Read a label map; float files holding whole numbers are accepted (some data sets store labels as float)."""
    image = read_volume(path)
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise UserError(f"{path}: label map holds non-integer values")
    if array.size and array.min() < 0:
        raise UserError(f"{path}: label map holds negative values")
    top = int(array.max()) if array.size else 0
    pixel = sitk.sitkUInt8 if top <= _UINT8_MAX_LABEL else sitk.sitkUInt16
    return sitk.Cast(image, pixel)


def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One file per slice, with the per-slice position and orientation tags that carry the geometry."""
    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkInt16):
        image = sitk.Cast(sitk.Round(image) if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64) else image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    uid_root = "1.2.826.0.1.3680043.2.1125"
    stamp = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    series_uid = f"{uid_root}.2.{int(time.time() * 1e6)}"
    study_uid = f"{uid_root}.1.{int(time.time() * 1e6)}"
    orientation = "\\".join(f"{v:.10g}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "OT",
            "0008|0020": stamp[0],
            "0008|0030": stamp[1],
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0011": "1",
            "0020|0013": str(k + 1),
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10g}" for v in position),
            "0018|0050": f"{image.GetSpacing()[2]:.10g}",
            "0028|0030": f"{image.GetSpacing()[1]:.10g}\\{image.GetSpacing()[0]:.10g}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(piece)


def write_image(image: sitk.Image, path: Path | str, compress: bool = True) -> None:
    """Write atomically; a path without an image suffix is written as a DICOM series folder."""
    path = Path(path)
    suffix = full_suffix(path).lower()
    if suffix in IMAGE_SUFFIXES and suffix not in (".nhdr", ".mhd"):
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
    elif suffix in ("", ".dcm", ".dicom"):
        with atomic_dir(path) as tmp:
            _write_dicom_series(image, tmp)
    else:
        raise UserError(f"{path}: unknown output format; use .nii.gz, .nii, .nrrd, .mha or a folder name for DICOM")
