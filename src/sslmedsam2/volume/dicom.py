"""DICOM: a series folder (or one multi-frame file) read as one volume only when its slices make one, and the
label-map series this tool writes.

Every file's header is read with pydicom first, so that what SimpleITK (GDCM) would silently average, stack or
misread is refused with the reason: objects that are not images (SEG, RT structure sets, reports), slices in
several orientations (localizers), a single slice (2D), missing, duplicated or unevenly spaced slices (unless
allowed), and pixel data shorter than declared. GDCM then reads the voxels, in the order of the slice positions.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.errors import UserError
from sslmedsam2.memory import check_room
from sslmedsam2.provenance import NOT_OURS, Mark, image_notes, notes_mark
from sslmedsam2.volume.geometry import GeometryWarning

# Marks the DICOM series this tool writes, so that replacing one never deletes anyone else's files.
MAKER = "sslmedsam2"
_SLICE = re.compile(r"^slice_\d{4}\.dcm$")
_COMMENTS = "0020|4000"  # ImageComments: the result a written series belongs to
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG (a segmentation object); load it in 3D Slicer or convert it with "
                                    "dcmqi's segimage2itkimage",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set (contours, no voxels)",
}
# Slice positions may differ from even spacing by this share of the spacing (DICOM stores decimal strings).
SPACING_TOLERANCE = 0.01


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _headers(folder: Path) -> list[tuple[Path, object]]:
    """(file, pydicom dataset without its large values) of every DICOM file in a folder; files that are not DICOM
    (notes, .DS_Store) are ignored, a damaged DICOM file is refused."""
    import pydicom

    found = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            found.append((path, pydicom.dcmread(path, defer_size=1024)))
        except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
            if _has_preamble(path):
                raise UserError(f"{path}: not a readable image (a damaged DICOM file: {exc})") from None
    return found


def _no_series(folder: Path) -> UserError:
    """The error for a folder without DICOM files, naming subfolders that have some (a series one level down)."""
    below = [d.name for d in sorted(folder.iterdir()) if d.is_dir() and _headers(d)][:3] if folder.is_dir() else []
    hint = f"; its subfolder{'s' if len(below) > 1 else ''} {', '.join(below)} hold{'' if len(below) > 1 else 's'} " \
           "DICOM files: give one of them" if below else ""
    return UserError(f"{folder}: folder holds no DICOM series{hint}")


def _one_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(path, defer_size=1024)
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise UserError(f"{path}: not a readable image (not a DICOM file: {exc})") from None


def _frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _check_pixels(path: Path, ds) -> None:
    """An image object whose pixel data is all there (native encodings; GDCM refuses short encapsulated data)."""
    sop = str(ds.get("SOPClassUID", ""))
    if sop in _NOT_IMAGES:
        raise UserError(f"{path}: not a readable image: {_NOT_IMAGES[sop]}")
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True) if _PIXEL_DATA in ds else None
    if element is None:
        modality = str(ds.get("Modality", "")).strip()
        raise UserError(f"{path}: not a readable image: a DICOM object without pixel data"
                        f"{f' ({modality})' if modality else ''}")
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    length = getattr(element, "length", None)
    if syntax not in _NATIVE_SYNTAXES or length is None or length == _UNDEFINED_LENGTH:
        return
    bits = int(ds.get("BitsAllocated", 16) or 16)
    expected = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("SamplesPerPixel", 1) or 1) \
        * _frames(ds) * bits // 8
    present = path.stat().st_size - getattr(element, "value_tell", 0)
    if min(length, present) < expected:
        raise UserError(f"{path}: not a readable image: incomplete pixel data ({min(length, present)} of {expected} "
                        "bytes); copy it again")


def _orientation(path: Path, ds) -> np.ndarray | None:
    values = ds.get("ImageOrientationPatient")
    if values is None or len(values) != 6:
        return None
    return np.asarray([float(v) for v in values])


def _position(ds) -> np.ndarray | None:
    values = ds.get("ImagePositionPatient")
    if values is None or len(values) != 3:
        return None
    return np.asarray([float(v) for v in values])


def _gap_problems(positions: np.ndarray) -> list[str]:
    """What is wrong with sorted slice positions along the normal: duplicates, gaps of another size."""
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    problems = []
    for k, gap in enumerate(gaps):
        where = f"{positions[k]:.2f} and {positions[k + 1]:.2f} mm"
        if gap <= SPACING_TOLERANCE * max(step, 1e-3):
            problems.append(f"two slices at {positions[k]:.2f} mm (duplicated)")
        elif abs(gap - step) > SPACING_TOLERANCE * step:
            ratio = gap / step
            missing = round(ratio) - 1
            if missing >= 1 and abs(ratio - round(ratio)) < SPACING_TOLERANCE * round(ratio):
                problems.append(f"{missing} slice{'s' if missing > 1 else ''} missing between {where}")
            else:
                problems.append(f"a gap of {gap:.3g} mm between {where}")
    return [f"slices are {step:.3g} mm apart, but " + problems[0], *problems[1:]] if problems else []


def _series_files(folder: Path, allow_uneven: bool) -> list[tuple[Path, object]]:
    """The files (with their headers) of the folder's one series, in the order of their positions, once every
    check has passed."""
    headers = _headers(folder)
    if not headers:
        raise _no_series(folder)
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise UserError(f"{folder}: folder holds {len(series)} DICOM series ({', '.join(series)}); give one series "
                        "per folder")
    for path, ds in headers:
        _check_pixels(path, ds)
    if len(headers) == 1:
        path, ds = headers[0]
        _check_multiframe(path, ds)
        return [(path, ds)]
    multi = [path.name for path, ds in headers if _frames(ds) > 1]
    if multi:
        raise UserError(f"{folder}: mixes multi-frame files ({', '.join(multi[:3])}) with other files; give one "
                        "multi-frame file or one folder of slices")
    sizes = {(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) for _, ds in headers}
    if len(sizes) > 1:
        raise UserError(f"{folder}: its slices differ in size ({', '.join(f'{r} x {c}' for r, c in sorted(sizes))}); "
                        "give one series of equal slices")
    orientations = [_orientation(path, ds) for path, ds in headers]
    positions = [_position(ds) for _, ds in headers]
    if any(o is None for o in orientations) or any(p is None for p in positions):
        raise UserError(f"{folder}: its slices carry no position or orientation (ImagePositionPatient, "
                        "ImageOrientationPatient), so they cannot be stacked into a volume")
    kinds: list[np.ndarray] = []
    for o in orientations:
        if not any(np.allclose(o, k, atol=1e-3) for k in kinds):
            kinds.append(o)
    if len(kinds) > 1:
        raise UserError(f"{folder}: its {len(headers)} slices lie in {len(kinds)} orientations (localizer images?); "
                        "a volume's slices are parallel: give one stack of parallel slices")
    row, column = kinds[0][:3], kinds[0][3:]
    normal = np.cross(row, column)
    along = np.asarray([float(p @ normal) for p in positions])
    order = np.argsort(along, kind="stable")
    first, last = positions[order[0]], positions[order[-1]]
    drift = (last - first) - (along[order[-1]] - along[order[0]]) * normal
    if np.linalg.norm(drift) > SPACING_TOLERANCE * max(abs(along[order[-1]] - along[order[0]]), 1e-3):
        raise UserError(f"{folder}: its slices are offset within their plane from one to the next ({np.linalg.norm(drift):.3g} mm "
                        "over the stack: a tilted gantry), so they are not a regular grid; convert the series with "
                        "a tool that corrects the tilt (dcm2niix, 3D Slicer's DICOM import)")
    problems = _gap_problems(along[order])
    if problems:
        if not allow_uneven or any("duplicated" in p for p in problems):
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            hint = "" if any("duplicated" in p for p in problems) else \
                "; if this is right (the series was acquired so), pass --allow-uneven-slices"
            raise UserError(f"{folder}: {'; '.join(problems[:3])}{more}{hint}")
        warnings.warn(GeometryWarning(f"{folder}: {'; '.join(problems[:3])}; reading it with an even spacing of "
                                      f"{(along.max() - along.min()) / (len(along) - 1):.3g} mm as asked"),
                      stacklevel=3)
    return [headers[i] for i in order]


def read_dicom(path: Path, allow_uneven: bool = False) -> sitk.Image:
    """A DICOM series folder or one multi-frame DICOM file as a 3D image (see the module's checks)."""
    path = Path(path)
    if path.is_dir():
        slices = _series_files(path, allow_uneven)
    else:
        ds = _one_header(path)
        _check_pixels(path, ds)
        _check_multiframe(path, ds)
        slices = [(path, ds)]
    files, headers = [f for f, _ in slices], [h for _, h in slices]
    ds = headers[0]
    if str(getattr(ds.file_meta, "TransferSyntaxUID", "")) == _BIG_ENDIAN and int(ds.get("BitsAllocated", 16)) > 16:
        raise UserError(f"{files[0]}: not a readable image: 32-bit pixels in the retired big-endian transfer "
                        "syntax, which the DICOM reader misreads; convert the file to little endian (e.g. with "
                        "dcmconv +te from DCMTK)")
    voxels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * _frames(ds) * len(files)
    check_room(voxels * 8, str(path))
    scalings = {(float(h.get("RescaleSlope", 1) or 1), float(h.get("RescaleIntercept", 0) or 0)) for h in headers}
    if len(files) == 1:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(files[0]))
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        if len(scalings) > 1:  # GDCM takes the pixel type from the first slice and would cut the others' fractions
            reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.SetImageIO("GDCMImageIO")
    image = reader.Execute()
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        image = _uninverted(image, ds, scalings)
    scaling = ds.get("DoseGridScaling")
    if str(ds.get("Modality", "")).strip() == "RTDOSE" and scaling is not None:  # GDCM leaves the dose unscaled
        image = sitk.Cast(image, sitk.sitkFloat64) * float(scaling)
    return image


def _uninverted(image: sitk.Image, ds, scalings: set[tuple[float, float]]) -> sitk.Image:
    """GDCM inverts MONOCHROME1 pixels (a display convention: white is low) before rescaling, to (2^bits - 1) - s
    unsigned, -s - 1 signed; give back stored x slope + intercept, as DICOM defines the values."""
    if len(scalings) != 1:
        raise UserError(f"{ds.filename}: MONOCHROME1 slices with different rescale slopes or intercepts; convert "
                        "the series to MONOCHROME2")
    slope, intercept = next(iter(scalings))
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    top = (-1 if signed else 2 ** bits - 1) * slope + 2 * intercept
    return float(top) - sitk.Cast(image, sitk.sitkFloat32 if slope == int(slope) and bits <= 16 else sitk.sitkFloat64)


def _check_multiframe(path: Path, ds) -> None:
    """One file as a volume: several frames, and where they lie (GDCM would invent a geometry)."""
    if "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        raise UserError(f"{path}: a Siemens mosaic (many slices tiled in one image); convert it with dcm2niix")
    if _frames(ds) < 2:
        raise UserError(f"{path}: a single DICOM slice, a 2D image; a 3D volume is needed (give the folder of the "
                        "whole series)")
    located = "ImageOrientationPatient" in ds or "SharedFunctionalGroupsSequence" in ds \
        or "PerFrameFunctionalGroupsSequence" in ds
    if not located:
        raise UserError(f"{path}: its frames carry no position or orientation, so where its voxels lie is unknown")


def dicom_folder_mark(folder: Path) -> Mark:
    """The mark of a folder holding only the slice files of a DICOM series that this tool wrote (Manufacturer,
    and the result in ImageComments); NOT_OURS for any other folder."""
    entries = list(Path(folder).iterdir())
    if not entries or not all(e.is_file() and _SLICE.match(e.name) for e in entries):
        return NOT_OURS
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(sorted(entries)[0]))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return NOT_OURS
    if not (reader.HasMetaDataKey("0008|0070") and reader.GetMetaData("0008|0070").strip() == MAKER):
        return NOT_OURS
    return Mark(True, notes_mark(reader.GetMetaData(_COMMENTS) if reader.HasMetaDataKey(_COMMENTS) else None).result)


def is_our_dicom_folder(folder: Path) -> bool:
    """A folder holding only the slice files of a DICOM series that this tool wrote."""
    return dicom_folder_mark(folder).ours


def read_own_series(folder: Path) -> sitk.Image:
    """A series this tool has just written, read back as GDCM orders it (no checks: it is being verified)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def write_dicom_series(image: sitk.Image, folder: Path, result: str | None = None) -> None:
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
            "0008|0070": MAKER,
            "0008|103e": "label map written by sslmedsam2",
            _COMMENTS: image_notes(result),
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
