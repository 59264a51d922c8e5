"""A corpus of damaged and misleading image files, made at test time from a small valid volume: every reader
(propagate, workspace add, evaluate, few-shot folders, server uploads) must refuse each with one line that says why.

Each entry: name -> (maker(folder) -> path to give the reader, a fragment the one-line error must contain).
"""

from __future__ import annotations

import bz2
import copy
import gzip
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SHAPE = (6, 10, 12)  # z, y, x


def _volume(dtype=np.int16) -> np.ndarray:
    return (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 97).astype(dtype)


def _sitk(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    return image


def _write(folder: Path, name: str, array=None, compress=False) -> Path:
    path = folder / name
    sitk.WriteImage(_sitk(_volume() if array is None else array), str(path), compress)
    return path


def _cut(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    return path


# --- NIfTI ------------------------------------------------------------------------------------------------------
def nifti_header(shape, datatype=4, bitpix=16, magic=b"n+1\0", pixdim=(1.0, 0.8, 0.9, 2.5), sform=True) -> bytes:
    """A NIfTI-1 header (348 bytes + 4 bytes of extension flag) written by hand."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    dims = [len(shape), *shape] + [1] * (7 - len(shape))
    struct.pack_into("<8h", header, 40, *dims)
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, *pixdim, 0, 0, 0, 0)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    struct.pack_into("<f", header, 112, 1.0)  # scl_slope
    if sform:
        struct.pack_into("<h", header, 254, 1)  # sform_code
        struct.pack_into("<4f", header, 280, -pixdim[1], 0, 0, 10)
        struct.pack_into("<4f", header, 296, 0, -pixdim[2], 0, -20)
        struct.pack_into("<4f", header, 312, 0, 0, pixdim[3], 5)
    header[344:348] = magic
    return bytes(header) + b"\0\0\0\0"


def _nii_truncated(folder: Path) -> Path:
    return _cut(_write(folder, "img.nii"), -50)


def _nii_gz_truncated(folder: Path) -> Path:
    return _cut(_write(folder, "img.nii.gz", compress=True), -20)


def _nii_gz_bad_crc(folder: Path) -> Path:
    path = _write(folder, "img.nii.gz", compress=True)
    stream = bytearray(gzip.compress(gzip.decompress(path.read_bytes())))
    stream[-8] ^= 0xFF
    path.write_bytes(bytes(stream))
    return path


def _nii_gz_bomb(folder: Path) -> Path:
    body = _write(folder, "small.nii").read_bytes()
    path = folder / "bomb.nii.gz"
    path.write_bytes(gzip.compress(body + bytes(32 << 20), compresslevel=1))
    return path


def _nii_huge_header(folder: Path) -> Path:
    path = folder / "huge.nii"
    path.write_bytes(nifti_header((1024, 1024, 384), datatype=16, bitpix=32))
    return path


def _nii_gz_huge_header(folder: Path) -> Path:
    path = folder / "huge.nii.gz"
    path.write_bytes(gzip.compress(nifti_header((1024, 1024, 384), datatype=16, bitpix=32)))
    return path


def _nii_complex(folder: Path) -> Path:
    path = folder / "complex.nii"
    path.write_bytes(nifti_header(SHAPE[::-1], datatype=32, bitpix=64) + np.ones(np.prod(SHAPE), np.complex64).tobytes())
    return path


def _nii_rgb(folder: Path) -> Path:
    path = folder / "rgb.nii"
    path.write_bytes(nifti_header(SHAPE[::-1], datatype=128, bitpix=24) + bytes(3 * int(np.prod(SHAPE))))
    return path


def _nii_nan(folder: Path) -> Path:
    array = _volume(np.float32)
    array[2, 3, 4] = np.nan
    return _write(folder, "nan.nii.gz", array, compress=True)


def _nii_2d(folder: Path) -> Path:
    path = folder / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((10, 12), np.float32)), str(path))
    return path


def _nii_4d(folder: Path) -> Path:
    path = folder / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 6, 10, 12), np.float32), isVector=False), str(path))
    return path


def _analyze(folder: Path) -> Path:
    header = bytearray(nifti_header(SHAPE[::-1], magic=b"\0\0\0\0", sform=False)[:348])
    struct.pack_into("<f", header, 108, 0.0)
    (folder / "scan.hdr").write_bytes(bytes(header))
    (folder / "scan.img").write_bytes(_volume().tobytes())
    return folder / "scan.hdr"


def _pair_truncated(folder: Path) -> Path:
    header = bytearray(nifti_header(SHAPE[::-1], magic=b"ni1\0")[:348])
    struct.pack_into("<f", header, 108, 0.0)
    (folder / "pair.hdr").write_bytes(bytes(header))
    (folder / "pair.img").write_bytes(_volume().tobytes()[:-100])
    return folder / "pair.hdr"


def _pair_without_img(folder: Path) -> Path:
    header = bytearray(nifti_header(SHAPE[::-1], magic=b"ni1\0")[:348])
    struct.pack_into("<f", header, 108, 0.0)
    (folder / "lonely.hdr").write_bytes(bytes(header))
    return folder / "lonely.hdr"


def _nii_zero_sform(folder: Path) -> Path:
    header = bytearray(nifti_header(SHAPE[::-1]))
    struct.pack_into("<4f", header, 280, 0, 0, 0, 10)  # sform's first column: zero
    path = folder / "flat_sform.nii"
    path.write_bytes(bytes(header) + _volume().tobytes())
    return path


def _nii_garbage(folder: Path) -> Path:
    path = folder / "notes.nii"
    path.write_bytes(b"these are my notes, not an image" * 20)
    return path


def _nii_gz_empty(folder: Path) -> Path:
    path = folder / "empty.nii.gz"
    path.write_bytes(b"")
    return path


# --- NRRD ---------------------------------------------------------------------------------------------------------
def nrrd(folder: Path, name: str, body: bytes, encoding="raw", sizes="12 10 6", kind="short", extra="") -> Path:
    head = (f"NRRD0004\ntype: {kind}\ndimension: {len(sizes.split())}\nsizes: {sizes}\nencoding: {encoding}\n"
            f"endian: little\nspace: left-posterior-superior\n{extra}\n")
    path = folder / name
    path.write_bytes(head.encode() + body)
    return path


def _nrrd_raw_truncated(folder: Path) -> Path:
    return nrrd(folder, "cut.nrrd", _volume().tobytes()[:-60])


def _nrrd_gzip_cut(folder: Path) -> Path:
    return nrrd(folder, "cut_gz.nrrd", gzip.compress(_volume().tobytes())[:-30], "gzip")


def _nrrd_gzip_short(folder: Path) -> Path:
    return nrrd(folder, "short_gz.nrrd", gzip.compress(_volume().tobytes()[:-60]), "gzip")


def _nrrd_bz2_cut(folder: Path) -> Path:
    return nrrd(folder, "cut_bz2.nrrd", bz2.compress(_volume().tobytes())[:-30], "bzip2")


def _nrrd_huge_raw(folder: Path) -> Path:
    return nrrd(folder, "huge.nrrd", b"", sizes="1024 1024 384", kind="float")


def _nrrd_huge_gzip(folder: Path) -> Path:
    return nrrd(folder, "huge_gz.nrrd", gzip.compress(b"\0" * 64), "gzip", sizes="1024 1024 384", kind="float")


def _nhdr_missing_data(folder: Path) -> Path:
    path = nrrd(folder, "detached.nhdr", b"", extra="data file: detached.raw\n")
    return path


def _nrrd_bad_type(folder: Path) -> Path:
    return nrrd(folder, "bad_type.nrrd", _volume().tobytes(), kind="nonsense")


def _nrrd_split(folder: Path) -> Path:
    return nrrd(folder, "split.nhdr", b"", extra="data file: LIST\npart1.raw\n")


def _nrrd_vector(folder: Path) -> Path:
    return nrrd(folder, "vector.nrrd", np.zeros((2, *SHAPE), np.int16).tobytes(), sizes="2 12 10 6",
                extra="kinds: vector domain domain domain\n")


def _nrrd_no_endian(folder: Path) -> Path:
    path = folder / "no_endian.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 12 10 6\nencoding: raw\n\n" + _volume().tobytes())
    return path


def _nrrd_named_mha(folder: Path) -> Path:
    path = _write(folder, "real.mha")
    return path.rename(folder / "fake.nrrd")


# --- MetaImage ----------------------------------------------------------------------------------------------------
def metaimage(folder: Path, name: str, body: bytes, compressed=False, dims="12 10 6", kind="MET_SHORT",
              data="LOCAL") -> Path:
    head = (f"ObjectType = Image\nNDims = {len(dims.split())}\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"CompressedData = {compressed}\nElementSpacing = 0.8 0.9 2.5\nDimSize = {dims}\nElementType = {kind}\n"
            f"ElementDataFile = {data}\n")
    path = folder / name
    path.write_bytes(head.encode() + body)
    return path


def _mha_raw_truncated(folder: Path) -> Path:
    return metaimage(folder, "cut.mha", _volume().tobytes()[:-60])


def _mha_zlib_cut(folder: Path) -> Path:
    return metaimage(folder, "cut_z.mha", zlib.compress(_volume().tobytes())[:-20], compressed=True)


def _mha_zlib_short(folder: Path) -> Path:
    return metaimage(folder, "short_z.mha", zlib.compress(_volume().tobytes()[:-60]), compressed=True)


def _mha_huge(folder: Path) -> Path:
    return metaimage(folder, "huge.mha", b"", dims="1024 1024 384", kind="MET_FLOAT")


def _mha_huge_zlib(folder: Path) -> Path:
    return metaimage(folder, "huge_z.mha", zlib.compress(b"\0" * 64), compressed=True, dims="1024 1024 384",
                     kind="MET_FLOAT")


def _mhd_missing_raw(folder: Path) -> Path:
    return metaimage(folder, "detached.mhd", b"", data="detached.raw")


def _mha_bad_type(folder: Path) -> Path:
    return metaimage(folder, "bad_type.mha", _volume().tobytes(), kind="MET_WHATEVER")


# --- DICOM --------------------------------------------------------------------------------------------------------
def dicom_series(folder: Path, positions, orientations=None, change: Callable | None = None, name="series") -> Path:
    """A CT series made from pydicom's CT_small.dcm: slice k at positions[k] (LPS mm), its voxels the original's
    plus 10 k."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = folder / name
    out.mkdir()
    series, study = generate_uid(), generate_uid()
    pixels = base.pixel_array.astype(np.int16)
    for k, position in enumerate(positions):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        if orientations is not None:
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientations[k]]
        ds.PixelData = (pixels + np.int16(10 * k)).tobytes()
        if change is not None:
            change(k, ds)
        ds.save_as(out / f"slice{k:02d}.dcm", enforce_file_format=True)
    return out


def even_positions(count: int = 6, step: float = 2.5) -> list[np.ndarray]:
    return [np.array([-158.1, -179.0, -75.7 + step * k]) for k in range(count)]


def _dicom_single(folder: Path) -> Path:
    return dicom_series(folder, even_positions(1))


def _dicom_single_file(folder: Path) -> Path:
    return dicom_series(folder, even_positions(1)) / "slice00.dcm"


def _dicom_missing(folder: Path) -> Path:
    return dicom_series(folder, [p for k, p in enumerate(even_positions()) if k != 3])


def _dicom_duplicate(folder: Path) -> Path:
    even = even_positions()
    return dicom_series(folder, even[:3] + [even[2]] + even[3:5])


def _dicom_uneven(folder: Path) -> Path:
    return dicom_series(folder, [np.array([-158.1, -179.0, -75.7 + z]) for z in (0, 2.5, 5, 7.5, 11.5, 14)])


def _dicom_two_orientations(folder: Path) -> Path:
    axial, coronal = [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1]
    even = even_positions(3)
    return dicom_series(folder, even + [np.array([-158.1, -170.0 + 2.5 * k, -60.0]) for k in range(3)],
                        [axial] * 3 + [coronal] * 3)


def _dicom_tilted(folder: Path) -> Path:
    return dicom_series(folder, [np.array([-158.1, -179.0 + 1.0 * k, -75.7 + 2.5 * k]) for k in range(6)])


def _dicom_truncated(folder: Path) -> Path:
    series = dicom_series(folder, even_positions())
    _cut(series / "slice03.dcm", -3000)
    return series


def _dicom_two_series(folder: Path) -> Path:
    from pydicom.uid import generate_uid

    other = generate_uid()
    return dicom_series(folder, even_positions(), change=lambda k, ds: k >= 3 and setattr(ds, "SeriesInstanceUID", other))


def _dicom_seg(folder: Path) -> Path:
    def as_seg(k, ds):
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66.4"
    return dicom_series(folder, even_positions(), change=as_seg)


def _dicom_nested(folder: Path) -> Path:
    outer = folder / "patient"
    outer.mkdir()
    dicom_series(outer, even_positions(), name="SE1")
    return outer


def _dicom_mosaic(folder: Path) -> Path:
    def mosaic(k, ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "MOSAIC"]
    return dicom_series(folder, even_positions(1), change=mosaic) / "slice00.dcm"


def _dicom_no_position(folder: Path) -> Path:
    def strip(k, ds):
        del ds.ImagePositionPatient
    return dicom_series(folder, even_positions(), change=strip)


def _dicom_big_endian_dose(folder: Path) -> Path:
    import shutil

    from pydicom.data import get_testdata_file

    path = folder / "dose.dcm"
    shutil.copy(get_testdata_file("rtdose_expb.dcm"), path)
    return path


# --- other ----------------------------------------------------------------------------------------------------------
def _text_file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("hello")
    return path


def _png(folder: Path) -> Path:
    path = folder / "photo.png"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12), np.uint8)), str(path))
    return path


CORPUS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nii truncated": (_nii_truncated, "incomplete"),
    "nii.gz truncated": (_nii_gz_truncated, "damaged or incomplete"),
    "nii.gz bad checksum": (_nii_gz_bad_crc, "damaged"),
    "nii.gz bomb": (_nii_gz_bomb, "more than its header declares"),
    "nii huge header": (_nii_huge_header, "incomplete"),
    "nii.gz huge header": (_nii_gz_huge_header, "more than"),
    "nii complex": (_nii_complex, "complex"),
    "nii rgb": (_nii_rgb, "RGB"),
    "nii NaN": (_nii_nan, "NaN"),
    "nii 2D": (_nii_2d, "2D"),
    "nii 4D": (_nii_4d, "4D"),
    "analyze 7.5": (_analyze, "Analyze"),
    "hdr/img truncated": (_pair_truncated, "incomplete"),
    "hdr without img": (_pair_without_img, "no such file"),
    "nii degenerate sform": (_nii_zero_sform, "voxel size of 0"),
    "nii garbage": (_nii_garbage, "no NIfTI header"),
    "nii.gz empty": (_nii_gz_empty, "not a readable image"),
    "nrrd raw truncated": (_nrrd_raw_truncated, "incomplete voxel data"),
    "nrrd gzip cut": (_nrrd_gzip_cut, "damaged or incomplete"),
    "nrrd gzip short": (_nrrd_gzip_short, "incomplete voxel data"),
    "nrrd bzip2 cut": (_nrrd_bz2_cut, "damaged or incomplete"),
    "nrrd huge raw": (_nrrd_huge_raw, "incomplete voxel data"),
    "nrrd huge gzip": (_nrrd_huge_gzip, "more than"),
    "nhdr data missing": (_nhdr_missing_data, "does not exist"),
    "nrrd bad type": (_nrrd_bad_type, "type"),
    "nrrd split files": (_nrrd_split, "several files"),
    "nrrd vector": (_nrrd_vector, "components"),
    "nrrd no endian": (_nrrd_no_endian, "endian"),
    "mha named nrrd": (_nrrd_named_mha, "NRRD"),
    "mha raw truncated": (_mha_raw_truncated, "incomplete voxel data"),
    "mha zlib cut": (_mha_zlib_cut, "damaged or incomplete"),
    "mha zlib short": (_mha_zlib_short, "incomplete voxel data"),
    "mha huge raw": (_mha_huge, "incomplete voxel data"),
    "mha huge zlib": (_mha_huge_zlib, "more than"),
    "mhd raw missing": (_mhd_missing_raw, "does not exist"),
    "mha bad type": (_mha_bad_type, "ElementType"),
    "dicom single slice folder": (_dicom_single, "single DICOM slice"),
    "dicom single slice file": (_dicom_single_file, "single DICOM slice"),
    "dicom missing slice": (_dicom_missing, "missing"),
    "dicom duplicated slice": (_dicom_duplicate, "duplicated"),
    "dicom uneven spacing": (_dicom_uneven, "gap of"),
    "dicom two orientations": (_dicom_two_orientations, "orientations"),
    "dicom gantry tilt": (_dicom_tilted, "tilted gantry"),
    "dicom truncated slice": (_dicom_truncated, "incomplete pixel data"),
    "dicom two series": (_dicom_two_series, "2 DICOM series"),
    "dicom SEG": (_dicom_seg, "DICOM SEG"),
    "dicom one folder down": (_dicom_nested, "subfolder SE1"),
    "dicom mosaic": (_dicom_mosaic, "mosaic"),
    "dicom no positions": (_dicom_no_position, "no position"),
    "dicom big-endian dose": (_dicom_big_endian_dose, "big-endian"),
    "text file": (_text_file, "unknown format"),
    "png": (_png, "unknown format"),
}
