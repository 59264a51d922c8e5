"""NIfTI-1 and NIfTI-2 files (.nii, .nii.gz, and .hdr/.img pairs), read by the engine itself with nibabel's header
classes: what SimpleITK's NIfTI reader cannot be trusted with.

niftilib, under SimpleITK, fills the missing part of a truncated file with zeros, turns NaN voxels into 0, reads
the voxels of an `x.nii` lying beside a requested `x.nii.gz`, and takes the spacing of an sform-only file from
pixdim. Here the file is read once, its gzip stream checked, its size checked against what its header declares,
and the geometry follows one documented rule (geometry_of).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.errors import UserError
from sslmedsam2.memory import check_room
from sslmedsam2.volume.geometry import GeometryWarning
from sslmedsam2.volume.inflate import check_ratio, inflate

_HEADER_BYTES = 540  # NIfTI-2's header; NIfTI-1's is 348
_NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".hdr.gz", ".img", ".img.gz")
# sform and qform may differ by this much (mm, at any corner of the volume) before the reader says so.
DISAGREEMENT_MM = 0.01
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def is_nifti(path: Path) -> bool:
    name = Path(path).name.lower()
    return name.endswith(_NIFTI_SUFFIXES)


def _compressed(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _pair(path: Path) -> tuple[Path, Path]:
    """(header file, voxel file): the same file, or an .hdr and its .img."""
    name = path.name
    lower = name.lower()
    gz = ".gz" if lower.endswith(".gz") else ""
    base = name[: len(name) - len(gz)]
    if base.lower().endswith(".img"):
        return path.with_name(base[:-4] + ".hdr" + gz), path
    if base.lower().endswith(".hdr"):
        return path, path.with_name(base[:-4] + ".img" + gz)
    return path, path


def parse_header(head: bytes, path: Path):
    """nibabel's NIfTI-1 or NIfTI-2 header from a file's first bytes (extensions are not parsed: the voxels are
    found from vox_offset). Analyze 7.5 and non-NIfTI files are refused with the reason."""
    import nibabel as nib

    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        size = cls.sizeof_hdr
        if len(head) >= size and cls.may_contain_header(head[:size]):
            block = head[:size]
            try:
                header = cls.from_fileobj(io.BytesIO(block), check=False)
            except Exception as exc:  # nibabel raises several types for a damaged header
                raise UserError(f"{path}: not a readable image (damaged NIfTI header: {exc})") from None
            return header
    if len(head) >= 348 and nib.AnalyzeHeader.may_contain_header(head[:348]):
        raise UserError(f"{path}: not a readable image: an Analyze 7.5 header, which stores no orientation; convert "
                        "it to NIfTI with its orientation known")
    raise UserError(f"{path}: not a readable image (no NIfTI header)")


def _affine_lps(header, path: Path) -> np.ndarray:
    """The 4 x 4 voxel-to-LPS matrix: the sform when its code is set, else the qform when its code is set, else
    pixdim alone, unrotated at the origin (as ITK reads it; with a GeometryWarning). When both are set and differ,
    the sform wins, as in nibabel, FSL and most tools, and a GeometryWarning says by how much they differ."""
    sform, sform_code = header.get_sform(coded=True)
    qform, qform_code = header.get_qform(coded=True)
    if sform_code:
        affine = sform
        if qform_code:
            shape = np.asarray(header.get_data_shape()[:3], dtype=float)
            corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in shape], indexing="ij")).reshape(3, -1)
            corners = np.vstack([corners, np.ones(corners.shape[1])])
            apart = float(np.abs((sform - qform) @ corners)[:3].max())
            if apart > DISAGREEMENT_MM:
                warnings.warn(GeometryWarning(f"{path.name}: its sform and qform differ by up to {apart:.3g} mm; "
                                              "using the sform"), stacklevel=3)
    elif qform_code:
        affine = qform
    else:  # as ITK reads it: pixdim's spacing, no rotation, at the origin
        warnings.warn(GeometryWarning(f"{path.name}: has neither sform nor qform, so its orientation is unknown; "
                                      "reading it unrotated at the origin, with pixdim's spacing"), stacklevel=3)
        zooms = [abs(float(z)) or 1.0 for z in header.get_zooms()[:3]]
        return np.diag([*zooms, 1.0])
    lps = np.eye(4)
    lps[:3, :3] = _RAS_TO_LPS @ np.asarray(affine[:3, :3], dtype=float)
    lps[:3, 3] = _RAS_TO_LPS @ np.asarray(affine[:3, 3], dtype=float)
    if not np.isfinite(lps).all():
        raise UserError(f"{path}: not a readable image: its orientation holds NaN or infinite numbers")
    return lps


def geometry_of(header, path: Path) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) in SimpleITK's LPS convention: spacing are the lengths of the affine's columns
    (not pixdim, which an sform-only file need not keep in step), direction the columns divided by them."""
    lps = _affine_lps(header, path)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if (spacing <= 0).any():
        raise UserError(f"{path}: not a readable image: its orientation gives a voxel size of 0")
    direction = lps[:3, :3] / spacing
    if abs(np.linalg.det(direction)) < 1e-6:
        raise UserError(f"{path}: not a readable image: its orientation is degenerate (two axes along one line)")
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


def _read_bytes(path: Path, limit) -> bytes:
    """A file's bytes; a gzip file is inflated (checked) no further than `limit` allows."""
    if not path.is_file():
        raise UserError(f"{path}: no such file (the voxel file of a NIfTI pair)")
    raw = path.read_bytes()
    if not _compressed(path):
        return raw
    return inflate(raw, "gzip", limit, str(path), head=_HEADER_BYTES if callable(limit) else 0)


def _voxel_shape(header, path: Path) -> tuple[int, ...]:
    """The (x, y, z) size; trailing dimensions of size 1 (a 4D file of one volume) are dropped."""
    shape = [int(n) for n in header.get_data_shape()]
    while len(shape) > 3 and shape[-1] == 1:
        shape.pop()
    if len(shape) != 3:
        raise UserError(f"{path}: is {len(shape)}D (size {' x '.join(map(str, shape))}); a 3D volume is needed")
    return tuple(shape)


def _voxel_dtype(header, path: Path) -> np.dtype:
    dtype = header.get_data_dtype()
    if dtype.fields is not None:
        raise UserError(f"{path}: holds colour (RGB) voxels; a scalar 3D image is needed")
    if dtype.kind == "c":
        raise UserError(f"{path}: holds complex-valued voxels; give a real-valued image (the magnitude)")
    if dtype.kind not in "iuf" and dtype.kind != "b":
        raise UserError(f"{path}: holds voxels of an unsupported type ({dtype})")
    return dtype


def _declared(header, path: Path) -> tuple[tuple[int, ...], np.dtype, int, int]:
    shape, dtype = _voxel_shape(header, path), _voxel_dtype(header, path)
    count = int(np.prod(shape, dtype=np.int64))
    return shape, dtype, count, count * dtype.itemsize


def read_nifti(path: Path) -> sitk.Image:
    """A checked NIfTI image: complete (gzip checksum and length, size as declared), finite, scaled as ITK scales
    (float32 when scl_slope/inter change values), on the geometry geometry_of gives. Anything else is a UserError.
    What the header declares is checked against the memory available and, compressed, against what the file can
    hold, before the voxels are inflated."""
    path = Path(path)
    header_path, voxel_path = _pair(path)
    if header_path != voxel_path:
        header = parse_header(_read_bytes(header_path, 1 << 20), header_path)
        _, _, count, nbytes = _declared(header, header_path)
        if _compressed(voxel_path) and voxel_path.is_file():
            check_ratio(nbytes, voxel_path.stat().st_size, "gzip", str(voxel_path))
        check_room(nbytes + 4 * count, str(path))
        data = _read_bytes(voxel_path, nbytes)
    else:
        def room(head: bytes) -> int:
            header = parse_header(head, path)
            _, _, count, nbytes = _declared(header, path)
            if _compressed(path):
                check_ratio(nbytes, path.stat().st_size, "gzip", str(path))
            check_room(int(header.get_data_offset()) + nbytes + 4 * count, str(path))
            return int(header.get_data_offset()) + nbytes

        data = _read_bytes(path, room)
        if not _compressed(path):
            room(data[:_HEADER_BYTES])
        header = parse_header(data, path)
    offset = int(header.get_data_offset())
    shape, dtype, count, nbytes = _declared(header, header_path)
    if len(data) < offset + nbytes:
        raise UserError(f"{voxel_path}: not a readable image: incomplete file ({len(data)} of {offset + nbytes} "
                        "bytes); copy it again")
    voxels = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape[::-1])
    if dtype.kind == "f" and not np.isfinite(voxels).all():
        bad = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
        raise UserError(f"{path}: {bad} voxels are NaN or infinite")
    slope, inter = header.get_slope_inter()
    if slope is not None and (slope != 1.0 or inter):  # as ITK does: scaled data becomes float32
        voxels = voxels.astype(np.float32) * np.float32(slope) + np.float32(inter or 0.0)
    elif dtype.kind == "b":
        voxels = voxels.astype(np.uint8)
    spacing, origin, direction = geometry_of(header, header_path)
    image = sitk.GetImageFromArray(voxels.astype(voxels.dtype.newbyteorder("="), copy=False))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    descrip = bytes(header["descrip"]).split(b"\0")[0].decode("latin-1").strip()
    if descrip:
        image.SetMetaData("ITK_FileNotes", descrip)
    return image


def nifti_notes(path: Path) -> str | None:
    """The descrip field of a NIfTI file's header (where this tool marks its outputs); None if unreadable."""
    import gzip

    header_path, _ = _pair(Path(path))
    try:
        with (gzip.open if _compressed(header_path) else open)(header_path, "rb") as handle:
            head = handle.read(_HEADER_BYTES)
        header = parse_header(head, header_path)
    except (OSError, EOFError, UserError):
        return None
    return bytes(header["descrip"]).split(b"\0")[0].decode("latin-1").strip()


def check_complete_nifti(path: Path) -> None:
    """A written file, read back: the gzip stream is complete and its checksum right (or, uncompressed, every
    voxel is there)."""
    path = Path(path)

    def declared(head: bytes) -> int:
        header = parse_header(head, path)
        return int(header.get_data_offset()) + _declared(header, path)[3]

    data = _read_bytes(path, declared)
    expected = declared(data[:_HEADER_BYTES])
    if len(data) < expected:
        raise UserError(f"{path}: incomplete file ({len(data)} of {expected} bytes)")
