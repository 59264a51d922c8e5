"""Read and write NIfTI, NRRD, MHA and DICOM series through SimpleITK, keeping the physical geometry."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import atomic_dir, atomic_path, check_writable, full_suffix
from sslmedsam2.errors import UserError
from sslmedsam2.volume.integrity import check_complete_nifti, is_nifti, read_nifti

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")
DICOM_SUFFIXES = ("", ".dcm", ".dicom")  # an output path with these is a DICOM series folder
# Formats whose geometry is a rotation only: a sheared grid would be silently replaced by its nearest rotation.
_ROTATION_ONLY = (".nii", ".nii.gz", *DICOM_SUFFIXES)
# Marks the DICOM series this tool writes, so that replacing one never deletes anyone else's files.
_DICOM_MAKER = "sslmedsam2"
_DICOM_SLICE = re.compile(r"^slice_\d{4}\.dcm$")
# Label maps up to this many labels are written as uint8, beyond as uint16.
_UINT8_MAX_LABEL = 255
MAX_LABEL = 65535  # label maps are uint8 or uint16: a larger value would wrap around into another label


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
        if path.is_dir():
            image = _read_dicom_series(path)
        elif is_nifti(path):
            image = read_nifti(path)
        else:
            image = sitk.ReadImage(str(path))
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
    image = read_volume(path)
    if image.GetPixelID() != sitk.sitkFloat32:  # Cast copies even to the same type (300 MB for 512 x 512 x 300)
        image = sitk.Cast(image, sitk.sitkFloat32)
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
    if top > MAX_LABEL:
        raise UserError(f"{path}: label map holds label {top}, above {MAX_LABEL}; renumber its labels")
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
            "0008|0070": _DICOM_MAKER,
            "0008|103e": "label map written by sslmedsam2",
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


def output_kind(path: Path | str) -> str:
    """'file' or 'dicom' (a folder of slices); an unknown suffix is refused before any work is done."""
    path = Path(path)
    suffix = full_suffix(path).lower()
    if suffix in (".nii", ".nii.gz") and full_suffix(path) != suffix:  # ITK's NIfTI writer refuses them
        raise UserError(f"{path}: write NIfTI with a lower-case suffix ({suffix})")
    if suffix in OUTPUT_SUFFIXES:
        return "file"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    raise UserError(f"{path}: unknown output format {suffix!r}; use .nii.gz, .nii, .nrrd, .mha or a folder name "
                    "(no suffix) for a DICOM series")


def is_our_dicom_folder(folder: Path) -> bool:
    """A folder holding only the slice files of a DICOM series that this tool wrote."""
    entries = list(Path(folder).iterdir())
    if not entries or not all(e.is_file() and _DICOM_SLICE.match(e.name) for e in entries):
        return False
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(sorted(entries)[0]))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return reader.HasMetaDataKey("0008|0070") and reader.GetMetaData("0008|0070").strip() == _DICOM_MAKER


def check_output(path: Path | str, inputs: tuple = ()) -> None:
    """Everything about an output that can be checked before the work: format, folder, not an input, and that an
    existing folder is one this tool wrote (it is replaced as a whole)."""
    from sslmedsam2.atomic import check_not_input

    path = Path(path)
    kind = output_kind(path)
    if kind == "dicom" and not path.name.strip("."):
        raise UserError(f"-o {path}: name a new folder for the DICOM series")
    check_writable(path, folder_output=kind == "dicom")
    check_not_input([path], inputs)
    if kind == "dicom" and path.is_dir() and any(path.iterdir()) and not is_our_dicom_folder(path):
        raise UserError(f"{path} is a folder with other files in it; a DICOM series output replaces its folder "
                        "as a whole: name a new or empty folder")


def is_orthogonal(direction: tuple[float, ...], tolerance: float = 1e-4) -> bool:
    """A 3 x 3 direction matrix (row-major, as SimpleITK gives it) that is a rotation or reflection."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    return bool(np.allclose(matrix.T @ matrix, np.eye(3), atol=tolerance))


def check_geometry_fits(image: sitk.Image, path: Path | str, what: str = "") -> None:
    """NIfTI and DICOM store a rotation: refuse a sheared grid rather than move voxels by millimetres."""
    if full_suffix(Path(path)).lower() in _ROTATION_ONLY and not is_orthogonal(image.GetDirection()):
        source = f"{what}: " if what else ""
        raise UserError(f"{source}its direction matrix is not orthogonal (a sheared grid), which {Path(path).name} "
                        "cannot store exactly; write .nrrd or .mha, or resample the image onto an orthogonal grid")


def _same_geometry(a, b) -> bool:
    """Size, spacing, origin and direction of two images or image readers, within what files store (float32)."""
    spacing = np.asarray(a.GetSpacing())
    return (tuple(a.GetSize()) == tuple(b.GetSize()) and np.allclose(spacing, b.GetSpacing(), rtol=1e-5)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-3 * spacing.min())
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def _verify(written: Path, image: sitk.Image, dicom: bool = False) -> None:
    """Read back what was written, before it replaces anything: a full disk or a failed write must not leave a
    short file behind a success message (niftilib ignores write errors)."""
    try:
        if is_nifti(written):
            check_complete_nifti(written)  # complete, checksum right: the voxels are what was written
            back = sitk.ImageFileReader()
            back.SetFileName(str(written))
            back.ReadImageInformation()
            good = _same_geometry(back, image)
        else:
            back = _read_dicom_series(written) if dicom else sitk.ReadImage(str(written))
            good = _same_geometry(back, image) and np.array_equal(sitk.GetArrayViewFromImage(back),
                                                                  sitk.GetArrayViewFromImage(image))
    except (UserError, RuntimeError):
        good = False
    if not good:
        raise OSError("the written file is incomplete or unreadable (is the disk full?)")


@contextlib.contextmanager
def staged_image(image: sitk.Image, path: Path | str, compress: bool = True) -> Iterator[None]:
    """Write and verify `image` into a temporary beside `path`; it replaces `path` when the block ends without an
    error, so whatever the block writes (a confidence table) is complete before the image appears.

    A path without an image suffix is a DICOM series folder. A failed write (full disk, permissions) is a
    UserError naming the file, and leaves nothing behind.
    """
    path = Path(path)
    kind = output_kind(path)
    check_geometry_fits(image, path)
    if kind == "dicom" and path.is_dir() and any(path.iterdir()) and not is_our_dicom_folder(path):
        raise UserError(f"{path} is a folder with other files in it; not replacing it with a DICOM series")
    try:
        with (atomic_path(path) if kind == "file" else atomic_dir(path)) as tmp:
            try:
                if kind == "file":
                    # level 1: a third faster than zlib's default, hardly larger for label maps
                    sitk.WriteImage(image, str(tmp), compress, 1 if compress else -1)
                else:
                    _write_dicom_series(image, tmp)
            except RuntimeError as exc:
                raise OSError(str(exc).strip().splitlines()[-1][:160]) from None
            _verify(tmp, image, dicom=kind == "dicom")
            yield
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_image(image: sitk.Image, path: Path | str, compress: bool = True) -> None:
    """Write atomically and verified (see staged_image)."""
    with staged_image(image, path, compress):
        pass


def write_images(images: list[tuple[sitk.Image, Path]]) -> None:
    """Several `write_image`s at once: SimpleITK compresses without holding Python's lock, so files are written
    side by side (0.97 s -> 0.51 s for four probability maps on the 2-core machine). Each is atomic and verified on
    its own; the first failure is raised once every write has ended."""
    if len(images) < 2:
        for image, path in images:
            write_image(image, path)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(images), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(write_image, image, path) for image, path in images]
    for future in futures:
        future.result()
