"""NRRD (.nrrd, .nhdr) and MetaImage (.mha, .mhd) files: their text headers read by the engine, so that what a
header declares is checked against the bytes present before anything is allocated, and the voxels are read
complete or refused (ITK reads a short compressed stream as zeros and only prints a message).

SimpleITK still reads the geometry (header only); the voxels of the common encodings (raw, gzip, bzip2, zlib)
come from the checked bytes. Text encodings are bounded by the file's size and then read by SimpleITK.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmedsam2.errors import UserError
from sslmedsam2.memory import check_room
from sslmedsam2.volume.inflate import check_ratio, inflate

HEADER_LIMIT = 1 << 20  # a longer text header is refused (a real one is a few kB)

_NRRD_TYPES = {
    np.dtype("int8"): ("signed char", "int8", "int8_t"),
    np.dtype("uint8"): ("uchar", "unsigned char", "uint8", "uint8_t"),
    np.dtype("int16"): ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    np.dtype("uint16"): ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    np.dtype("int32"): ("int", "signed int", "int32", "int32_t"),
    np.dtype("uint32"): ("uint", "unsigned int", "uint32", "uint32_t"),
    np.dtype("int64"): ("longlong", "long long", "long long int", "signed long long", "signed long long int",
                        "int64", "int64_t"),
    np.dtype("uint64"): ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    np.dtype("float32"): ("float",),
    np.dtype("float64"): ("double",),
}
_NRRD_TYPE = {name: dtype for dtype, names in _NRRD_TYPES.items() for name in names}
_NRRD_ENCODING = {"raw": "raw", "gz": "gzip", "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2",
                  "txt": "text", "text": "text", "ascii": "text", "hex": "hex"}
_META_TYPE = {"MET_CHAR": "int8", "MET_UCHAR": "uint8", "MET_SHORT": "int16", "MET_USHORT": "uint16",
              "MET_INT": "int32", "MET_UINT": "uint32", "MET_LONG": "int32", "MET_ULONG": "uint32",
              "MET_LONG_LONG": "int64", "MET_ULONG_LONG": "uint64", "MET_FLOAT": "float32", "MET_DOUBLE": "float64"}


@dataclass(frozen=True)
class VoxelLayout:
    """Where and how a header says its voxels are stored."""

    data_file: Path
    offset: int | None  # bytes before the voxels in data_file; None: the voxels are the file's last bytes
    encoding: str  # raw, gzip, bzip2, zlib, text or hex
    dtype: np.dtype  # with its byte order
    sizes: tuple[int, ...]  # as the header lists them, fastest first (components included)

    @property
    def count(self) -> int:
        return int(np.prod(self.sizes, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def _text_header(path: Path, end: str) -> tuple[list[str], int]:
    """The header's lines and its length in bytes: up to a blank line (NRRD) or the ElementDataFile line
    (MetaImage), or the end of the file."""
    lines, read = [], 0
    with open(path, "rb") as handle:
        while read < HEADER_LIMIT:
            raw = handle.readline(HEADER_LIMIT - read)
            if not raw:
                return lines, read
            read += len(raw)
            line = raw.decode("latin-1").rstrip("\r\n")
            if end == "blank" and not line.strip():
                return lines, read
            lines.append(line)
            if end == "ElementDataFile" and line.split("=", 1)[0].strip() == "ElementDataFile":
                return lines, read
    raise UserError(f"{path}: not a readable image: its header is longer than {HEADER_LIMIT >> 20} MB")


def _ints(value: str, path: Path, what: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in value.split())
    except ValueError:
        raise UserError(f"{path}: not a readable image: its {what} are not whole numbers ({value.strip()[:60]})") from None
    if not numbers or min(numbers) < 1:
        raise UserError(f"{path}: not a readable image: its {what} ({value.strip()[:60]}) must be positive")
    return numbers


def _data_file(name: str, header: Path, kind: str) -> Path:
    name = name.strip()
    if name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1:
        raise UserError(f"{header}: its voxels are split over several files ({kind} '{name[:60]}'); save the image "
                        "as one file (.nrrd, .mha or .nii.gz)")
    return (header.parent / name) if not Path(name).is_absolute() else Path(name)


def nrrd_layout(path: Path) -> VoxelLayout:
    """The voxel layout an NRRD header (.nrrd with its data attached, or a detached .nhdr) declares."""
    path = Path(path)
    lines, length = _text_header(path, "blank")
    if not lines or not lines[0].startswith("NRRD000"):
        raise UserError(f"{path}: not a readable image (no NRRD magic line)")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if sep and not value.startswith("="):  # "key:=value" lines are free-form metadata
            fields[key.strip().lower().replace(" ", "").replace("_", "")] = value.strip()
    kind = fields.get("type", "").lower()
    if kind not in _NRRD_TYPE:
        raise UserError(f"{path}: not a readable image: NRRD type '{kind[:40]}' is not a number type")
    encoding = _NRRD_ENCODING.get(fields.get("encoding", "").lower())
    if encoding is None:
        raise UserError(f"{path}: not a readable image: NRRD encoding '{fields.get('encoding', '')[:40]}' is unknown")
    sizes = _ints(fields.get("sizes", ""), path, "sizes")
    dtype = _NRRD_TYPE[kind]
    if dtype.itemsize > 1 and encoding not in ("text",):
        endian = fields.get("endian", "").lower()
        if endian not in ("little", "big"):
            raise UserError(f"{path}: not a readable image: a multi-byte NRRD type needs 'endian: little' or 'big'")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    detached = fields.get("datafile")
    data_file = _data_file(detached, path, "data file") if detached else path
    skip_lines = int(fields.get("lineskip", "0") or 0)
    skip = int(fields.get("byteskip", "0") or 0)
    offset: int | None = 0 if detached else length
    if skip_lines:
        with open(data_file, "rb") as handle:
            handle.seek(offset or 0)
            for _ in range(skip_lines):
                handle.readline()
            offset = handle.tell()
    if skip == -1:
        if encoding != "raw":
            raise UserError(f"{path}: not a readable image: 'byte skip: -1' needs raw encoding")
        offset = None
    else:
        offset = (offset or 0) + skip
    return VoxelLayout(data_file, offset, encoding, dtype, sizes)


def metaimage_layout(path: Path) -> VoxelLayout:
    """The voxel layout a MetaImage header (.mha with its data attached, or .mhd) declares."""
    path = Path(path)
    lines, length = _text_header(path, "ElementDataFile")
    fields = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    if "ElementDataFile" not in fields or "DimSize" not in fields:
        raise UserError(f"{path}: not a readable image (no MetaImage header with DimSize and ElementDataFile)")
    kind = fields.get("ElementType", "")
    if kind not in _META_TYPE:
        raise UserError(f"{path}: not a readable image: MetaImage ElementType '{kind[:40]}' is not a number type")
    sizes = _ints(fields["DimSize"], path, "DimSize")
    channels = _ints(fields.get("ElementNumberOfChannels", "1"), path, "ElementNumberOfChannels")[0]
    if channels > 1:
        sizes = (channels, *sizes)
    msb = fields.get("BinaryDataByteOrderMSB", fields.get("ElementByteOrderMSB", "False")).lower() == "true"
    dtype = np.dtype(_META_TYPE[kind]).newbyteorder(">" if msb else "<")
    if fields.get("BinaryData", "True").lower() != "true":
        encoding = "text"
    else:
        encoding = "zlib" if fields.get("CompressedData", "False").lower() == "true" else "raw"
    local = fields["ElementDataFile"].upper() == "LOCAL"
    data_file = path if local else _data_file(fields["ElementDataFile"], path, "ElementDataFile")
    skip = int(fields.get("HeaderSize", "0") or 0)
    offset: int | None
    if skip == -1:
        offset = None
    else:
        offset = (length if local else 0) + skip
    return VoxelLayout(data_file, offset, encoding, dtype, sizes)


def layout_of(path: Path) -> VoxelLayout | None:
    """The layout of an NRRD or MetaImage file by its suffix; None for other formats."""
    suffix = Path(path).suffix.lower()
    if suffix in (".nrrd", ".nhdr"):
        return nrrd_layout(path)
    if suffix in (".mha", ".mhd"):
        return metaimage_layout(path)
    return None


_TEXT_VALUE = re.compile(rb"\S+")


def read_voxels(layout: VoxelLayout, what: str) -> np.ndarray | None:
    """The voxels (a flat array in file order, native byte order), refused when the file holds fewer bytes than
    declared, its compressed stream is damaged, or they cannot fit in memory. For text encodings only the
    bound is checked and None returned (SimpleITK reads them)."""
    if not layout.data_file.is_file():
        raise UserError(f"{what}: not a readable image: its voxel file {layout.data_file.name} does not exist")
    size = layout.data_file.stat().st_size
    start = size - layout.nbytes if layout.offset is None else layout.offset
    present = size - max(start, 0)
    if layout.encoding in ("text", "hex"):
        least = layout.count * (2 * layout.dtype.itemsize if layout.encoding == "hex" else 1)
        if present < least:
            raise UserError(f"{what}: not a readable image: its header declares {layout.count} voxels, more than "
                            f"the {present} characters of data can hold")
        check_room(layout.nbytes + 4 * layout.count, what)
        return None
    if layout.encoding == "raw":
        if start < 0 or present < layout.nbytes:
            raise UserError(f"{what}: not a readable image: incomplete voxel data ({max(present, 0)} of "
                            f"{layout.nbytes} bytes); copy it again")
        check_room(layout.nbytes + 4 * layout.count, what)
        with open(layout.data_file, "rb") as handle:
            handle.seek(start)
            data = handle.read(layout.nbytes)
    else:
        check_ratio(layout.nbytes, present, layout.encoding, what)
        check_room(present + layout.nbytes + 4 * layout.count, what)
        with open(layout.data_file, "rb") as handle:
            handle.seek(start)
            raw = handle.read()
        data = inflate(raw, layout.encoding, layout.nbytes, what)
        if len(data) < layout.nbytes:
            raise UserError(f"{what}: not a readable image: incomplete voxel data (decompresses to {len(data)} of "
                            f"{layout.nbytes} bytes); copy it again")
    voxels = np.frombuffer(data, dtype=layout.dtype, count=layout.count)
    return voxels.astype(layout.dtype.newbyteorder("="), copy=False)
