"""An uploaded image, from its bytes to the 8-bit slices SAM2 reads: stored in the session's private folder and
read by the engine's own reader (every check of the command line applies), then deleted."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import full_suffix
from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec
from sslmedsam2.server.errors import TooLarge
from sslmedsam2.settings import AXES
from sslmedsam2.volume import read_image
from sslmedsam2.volume.slices import SliceVolume

# Formats kept under their own suffix; anything else is stored as `image.bin` and read by content (NIfTI, DICOM
# files), so that a name never chooses a reader that follows references to other files.
_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_READ = 1 << 16
# An upload is written this far before the image header there bounds the rest; a longer header is refused.
_HEAD = 1 << 20


def _private_file(path: Path) -> BinaryIO:
    """A new file only its owner can read (mode 0600); an existing one is never reused."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _gunzip(data: bytes, name: str) -> Iterator[bytes]:
    """Inflate a gzip body a piece (at most _READ bytes) at a time; the caller stops when it has had enough."""
    inflate = zlib.decompressobj(wbits=31)
    try:
        for start in range(0, len(data), _READ):
            tail = data[start:start + _READ]
            while True:
                piece = inflate.decompress(tail, _READ)
                tail = inflate.unconsumed_tail
                if not piece and not tail:
                    break
                yield piece
        yield inflate.flush()
    except zlib.error as exc:
        raise UserError(f"{name}: the upload says gzip but is not gzip data ({exc})") from None


def _declared_voxels(path: Path, name: str, max_voxels: int) -> int | None:
    """Voxels (times components) an image's header declares, refused above `max_voxels`; None when SimpleITK
    cannot read the header (the engine's reader then says why, in the command line's words)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    voxels = int(np.prod(reader.GetSize(), dtype=np.int64)) * reader.GetNumberOfComponents()
    if voxels > max_voxels:
        raise TooLarge(f"{name}: {voxels} voxels ({' x '.join(map(str, reader.GetSize()))}), more than the "
                       f"{max_voxels} this server accepts")
    return voxels


def _write_inflated(path: Path, pieces: Iterable[bytes], name: str, max_voxels: int) -> None:
    """Write an inflated upload privately (0600): its first MB, then no more than the image header there declares
    (8 bytes a voxel at most), so that a small gzip body cannot become gigabytes on disk."""
    limit, total = _HEAD, 0
    with _private_file(path) as handle:
        for piece in pieces:
            total += len(piece)
            if limit == _HEAD and total > limit:
                handle.flush()
                voxels = _declared_voxels(path, name, max_voxels)
                if voxels is None:
                    raise UserError(f"{name}: not a readable image (no image header in its first "
                                    f"{_HEAD >> 20} MB)")
                limit = _HEAD + 8 * voxels
            if total > limit:
                raise TooLarge(f"{name}: decompresses to more than its image header declares")
            handle.write(piece)


def _detached_data(path: Path, suffix: str, name: str) -> str | None:
    """The external data file a NRRD or MetaImage header names, if any (it could be any file of the server). The
    whole header is read: to its blank line (NRRD) or its ElementDataFile line, the last (MetaImage)."""
    read = 0
    with open(path, "rb") as handle:
        while read < _HEAD:
            raw = handle.readline(_HEAD - read)
            if not raw:
                return None  # no more header: the reader refuses what it cannot read
            read += len(raw)
            line = raw.decode("latin-1").strip()
            if suffix == ".nrrd" and not line:
                return None  # the header ends; the data follows in this file
            key, sep, value = line.partition("=" if suffix == ".mha" else ":")
            key = key.strip().lower().replace(" ", "")
            if suffix == ".nrrd" and sep and key in ("datafile", "data_file"):
                return value.strip()
            if suffix == ".mha" and sep and key == "elementdatafile":
                return None if value.strip().upper() == "LOCAL" else value.strip()
    raise UserError(f"{name}: its header is longer than {_HEAD >> 20} MB; send it as .nii.gz")


def store_upload(folder: Path, data: bytes, name: str, gzipped: bool, max_voxels: int) -> Path:
    """Write the uploaded file into `folder` (mode 0600) under a name whose suffix picks the reader."""
    suffix = full_suffix(Path(name)).lower()
    target = folder / f"image{suffix if suffix in _SUFFIXES else '.bin'}"
    if gzipped:
        _write_inflated(target, _gunzip(data, name), name, max_voxels)
    else:  # no larger than the request limit
        with _private_file(target) as handle:
            handle.write(data)
    if suffix in (".nrrd", ".mha"):
        detached = _detached_data(target, suffix, name)
        if detached:
            raise UserError(f"{name}: its header names a separate data file ({detached[:80]}); send an image whose "
                            "voxels are in the file itself (.nii.gz, or .nrrd / .mha with attached data)")
    return target


def _renamed(exc: UserError, path: Path, name: str) -> UserError:
    """The engine's message about the stored file, naming the user's file instead (as the command line does)."""
    return UserError(str(exc).replace(str(path), name))


def read_volume_slices(path: Path, name: str, axis: str, intensity: IntensitySpec, max_voxels: int) -> SliceVolume:
    """The stored upload -> checked image -> slices along `axis`, normalised as `propagate` does; deletes the file."""
    try:
        if axis not in AXES:
            raise UserError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
        _declared_voxels(path, name, max_voxels)  # too large: refused from the header, before decompressing
        try:
            image = read_image(path)
        except UserError as exc:
            raise _renamed(exc, path, name) from None
        return SliceVolume.from_image(image, axis, intensity, name)
    finally:
        path.unlink(missing_ok=True)
