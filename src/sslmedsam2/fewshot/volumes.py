"""Support and query volumes, brought to one orientation so that their slices stack the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sslmedsam2.atomic import full_suffix, stem
from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec
from sslmedsam2.volume import check_same_grid, read_image, read_label_map
from sslmedsam2.volume.io import IMAGE_SUFFIXES
from sslmedsam2.volume.slices import SliceVolume


def load_volume(path: Path, axis: str, intensity: IntensitySpec, label_path: Path | None = None,
                allow_uneven: bool = False) -> SliceVolume:
    """A support (with its label map) or a query as 8-bit slices along `axis`, in the canonical (LPS) in-plane
    orientation, so that the slices of differently stored volumes line up in one video."""
    image = read_image(path, allow_uneven)
    label_image = None
    if label_path is not None:
        label_image = read_label_map(label_path)
        check_same_grid(image, label_image, what=f"label map {label_path.name}")
    volume = SliceVolume.from_image(image, axis, intensity, stem(path), canonical=True, labels=label_image,
                                    path=Path(path))
    if volume.labels is not None and not volume.labels.any():
        raise UserError(f"support {label_path}: the label map has no labelled voxel")
    return volume


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


def check_label_sets(supports: list[SliceVolume]) -> list[int]:
    """All supports must carry the same labels, or the pseudo-labels would silently drop structures."""
    sets = {s.name: tuple(int(v) for v in np.unique(s.labels) if v) for s in supports}
    reference_name, reference = next(iter(sets.items()))
    for name, labels in sets.items():
        if labels != reference:
            raise UserError(f"supports carry different labels: {reference_name} has {list(reference)}, {name} has "
                            f"{list(labels)}")
    return list(reference)
