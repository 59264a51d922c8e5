"""Support and query volumes, brought to one orientation so that their slices stack the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import full_suffix, stem
from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.volume import check_same_grid, read_image, read_label_map
from sslmedsam2.volume.io import IMAGE_SUFFIXES

# Arrays of an image oriented to LPS are (S, P, L) = (axial, coronal, sagittal) slice-first in numpy order.
_ORIENTATION = "LPS"
_AXIS_TO_ARRAY = {"axial": 0, "coronal": 1, "sagittal": 2}


@dataclass
class FewShotVolume:
    """An image (and for supports its labels) as 8-bit slices along the chosen anatomical axis."""

    name: str
    path: Path
    image: sitk.Image  # as read, for writing results back on its grid
    slices: np.ndarray  # (n, h, w) uint8
    labels: np.ndarray | None  # (n, h, w) for supports
    axis: str

    def to_image(self, slice_first: np.ndarray) -> sitk.Image:
        """A slice-first array back onto the original image grid."""
        oriented = sitk.GetImageFromArray(np.moveaxis(slice_first, 0, _AXIS_TO_ARRAY[self.axis]))
        reference = sitk.DICOMOrient(self.image, _ORIENTATION)
        oriented.CopyInformation(reference)
        back = sitk.DICOMOrient(oriented, sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.image.GetDirection()))
        back.CopyInformation(self.image)
        return back


def _slice_first(image: sitk.Image, axis: str) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(sitk.GetArrayFromImage(sitk.DICOMOrient(image, _ORIENTATION)), _AXIS_TO_ARRAY[axis], 0))


def load_volume(path: Path, axis: str, intensity: IntensitySpec, label_path: Path | None = None,
                allow_uneven: bool = False) -> FewShotVolume:
    image = read_image(path, allow_uneven)
    labels = None
    if label_path is not None:
        label_image = read_label_map(label_path)
        check_same_grid(image, label_image, what=f"label map {label_path.name}")
        labels = _slice_first(label_image, axis)
        if not labels.any():
            raise UserError(f"support {label_path}: the label map has no labelled voxel")
    return FewShotVolume(stem(path), path, image, to_uint8(_slice_first(image, axis), intensity), labels, axis)


def list_images(folder: Path, what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder}: no such folder")
    found = sorted(p for p in folder.iterdir() if p.is_file() and full_suffix(p).lower() in IMAGE_SUFFIXES)
    if not found:
        raise UserError(f"{what} folder {folder} holds no image (.nii, .nii.gz, .nrrd, .mha)")
    return found


def pair_supports(images: Path, labels: Path) -> list[tuple[Path, Path]]:
    """Support images with their label maps, matched by file name."""
    image_files = list_images(images, "support image")
    label_files = {p.name: p for p in list_images(labels, "support label")}
    missing = [p.name for p in image_files if p.name not in label_files]
    if missing:
        raise UserError(f"support images without a label map of the same name in {labels}: {', '.join(missing[:5])}")
    return [(p, label_files[p.name]) for p in image_files]


def check_label_sets(supports: list[FewShotVolume]) -> list[int]:
    """All supports must carry the same labels, or the pseudo-labels would silently drop structures."""
    sets = {s.name: tuple(int(v) for v in np.unique(s.labels) if v) for s in supports}
    reference_name, reference = next(iter(sets.items()))
    for name, labels in sets.items():
        if labels != reference:
            raise UserError(f"supports carry different labels: {reference_name} has {list(reference)}, {name} has "
                            f"{list(labels)}")
    return list(reference)
