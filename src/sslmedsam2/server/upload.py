"""An uploaded image, from its bytes to the 8-bit slices SAM2 reads: stored in the session's private folder and
read by the engine's own reader (every check of the command line applies), then deleted."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import full_suffix
from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.server.errors import TooLarge
from sslmedsam2.volume import SliceAxis, read_image, slice_axis

# Formats kept under their own suffix; anything else is stored as `image.bin` and read by content (NIfTI, DICOM
# files), so that a name never chooses a reader that follows references to other files.
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_READ = 1 << 16


@dataclass(frozen=True)
class Volume:
    """What a session keeps of its image: the grid (to write results on it) and the 8-bit slices along the axis."""

    size: tuple[int, int, int]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    array_axis: int
    slices: np.ndarray  # (n, h, w) uint8

    def to_image(self, slice_first: np.ndarray) -> sitk.Image:
        """A slice-first array on this grid, as `pipeline.Case.to_image` makes it (without keeping the image)."""
        out = sitk.GetImageFromArray(np.moveaxis(slice_first, 0, self.array_axis))
        out.SetSpacing(self.spacing)
        out.SetOrigin(self.origin)
        out.SetDirection(self.direction)
        return out


def _private_write(path: Path, chunks) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        for chunk in chunks:
            handle.write(chunk)


def _gunzip(data: bytes, limit: int, name: str):
    """Inflate a gzip body in pieces, never past `limit` bytes (a small upload cannot become a huge file)."""
    inflate = zlib.decompressobj(wbits=31)
    total = 0
    try:
        for start in range(0, len(data), _READ):
            piece = inflate.decompress(data[start:start + _READ], limit + 1 - total)
            while True:
                total += len(piece)
                if total > limit:
                    raise TooLarge(f"{name}: decompresses to more than the {limit >> 20} MB an image may take here")
                yield piece
                if not inflate.unconsumed_tail:
                    break
                piece = inflate.decompress(inflate.unconsumed_tail, limit + 1 - total)
        yield inflate.flush()
    except zlib.error as exc:
        raise UserError(f"{name}: the upload says gzip but is not gzip data ({exc})") from None


def _detached_data(path: Path, suffix: str) -> str | None:
    """The external data file a NRRD or MetaImage header names, if any (it could be any file of the server)."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    text = head.split(b"\n\n", 1)[0] if suffix == ".nrrd" else head
    for raw in text.splitlines():
        line = raw.decode("latin-1").strip()
        key, sep, value = line.partition("=" if suffix == ".mha" else ":")
        key = key.strip().lower().replace(" ", "")
        if suffix == ".nrrd" and sep and key in ("datafile", "data_file"):
            return value.strip()
        if suffix == ".mha" and sep and key == "elementdatafile":
            return None if value.strip().upper() == "LOCAL" else value.strip()
    return None


def store_upload(folder: Path, data: bytes, name: str, gzipped: bool, max_bytes: int) -> Path:
    """Write the uploaded file into `folder` (mode 0600) under a name whose suffix picks the reader."""
    suffix = full_suffix(Path(name)).lower()
    target = folder / f"image{suffix if suffix in _SUFFIXES else '.bin'}"
    _private_write(target, _gunzip(data, max_bytes, name) if gzipped else [data])
    if suffix in (".nrrd", ".mha"):
        detached = _detached_data(target, suffix)
        if detached:
            raise UserError(f"{name}: its header names a separate data file ({detached[:80]}); send an image whose "
                            "voxels are in the file itself (.nii.gz, or .nrrd / .mha with attached data)")
    return target


def _check_size(path: Path, name: str, max_voxels: int) -> None:
    """Refuse an image too large for this server from its header alone, before its voxels are decompressed."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # unreadable: the engine's reader says why, in the command line's words
    voxels = int(np.prod(reader.GetSize(), dtype=np.int64)) * reader.GetNumberOfComponents()
    if voxels > max_voxels:
        raise TooLarge(f"{name}: {voxels} voxels ({' x '.join(map(str, reader.GetSize()))}), more than the "
                       f"{max_voxels} this server accepts")


def _renamed(exc: UserError, path: Path, name: str) -> UserError:
    """The engine's message about the stored file, naming the user's file instead (as the command line does)."""
    return UserError(str(exc).replace(str(path), name))


def read_volume_slices(path: Path, name: str, axis: str, intensity: IntensitySpec, max_voxels: int) -> Volume:
    """The stored upload -> checked image -> slices along `axis`, normalised as `propagate` does; deletes the file."""
    try:
        try:
            axis = SliceAxis(axis).value
        except ValueError:
            raise UserError(f"unknown axis {axis!r}; choose one of {', '.join(a.value for a in SliceAxis)}") from None
        _check_size(path, name, max_voxels)
        try:
            image = read_image(path)
        except UserError as exc:
            raise _renamed(exc, path, name) from None
        array_axis = slice_axis(image, axis)
        slices = to_uint8(np.moveaxis(sitk.GetArrayViewFromImage(image), array_axis, 0), intensity)  # no copy
        return Volume(tuple(image.GetSize()), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                      array_axis, slices)
    finally:
        path.unlink(missing_ok=True)
