"""File in, file out: an image and a few drawn slices -> a full label map and its confidence table."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.models import get_model
from sslmedsam2.models.cache import cached_path, ensure_weights, is_cached, manual_install_hint
from sslmedsam2.models.registry import DEFAULT_MODEL, check_image_size
from sslmedsam2.propagation.confidence import confidence_path, write_result
from sslmedsam2.propagation.result import Progress, Propagation
from sslmedsam2.propagation.seeds import Seeds
from sslmedsam2.volume import check_same_grid, read_image, read_label_map, slice_axis
from sslmedsam2.volume.io import check_geometry_fits, check_output, check_table_output

METHODS = ("auto", "sam2", "interpolate")
# More distinct values than this in a seed map means it is not a drawing (IMAGE and SEEDS swapped?).
MAX_SEED_LABELS = 50


@dataclass
class PropagateOptions:
    method: str = "auto"  # auto: SAM2 when weights can be had, else interpolation (said plainly)
    model: str = DEFAULT_MODEL
    checkpoint: Path | None = None
    device: str = "auto"
    image_size: int | None = None
    axis: str = "axial"
    intensity: IntensitySpec = field(default_factory=IntensitySpec)
    download: bool = True
    seed_slices: list[int] | None = None  # use only these slices of SEEDS as prompts (re-propagation from a review)
    compile: bool = False  # SAM2's tracking step compiled (propagation/compiled.py)
    allow_uneven: bool = False  # accept a DICOM series with missing slices or uneven spacing


@dataclass
class PropagateReport:
    method: str
    output: Path
    confidence: Path
    labels: list[int]
    slices: int
    seconds: float
    model: str | None = None
    device: str | None = None


@dataclass
class Case:
    """An image with its seeds, both in slice-first order along the chosen axis."""

    image: sitk.Image
    array_axis: int
    volume: np.ndarray
    seeds: Seeds

    def to_image(self, slice_first: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(np.moveaxis(slice_first, 0, self.array_axis))
        out.CopyInformation(self.image)
        return out


def check_seed_map(seeds: np.ndarray, what: str) -> Seeds:
    """A drawing: a few labels, at least one voxel (the same rule for a SEEDS file and a server's prompts). Returns
    the map as Seeds, searched once (a search of 512 x 512 x 300 voxels takes about 30 ms)."""
    checked = Seeds(seeds, allow_empty=True)
    distinct = len(checked.labels)
    if distinct > MAX_SEED_LABELS:
        raise UserError(f"{what}: holds {distinct} distinct labels, more than the {MAX_SEED_LABELS} structures "
                        "propagated at once (0 = background). Are IMAGE and SEEDS swapped?")
    if not distinct:
        raise UserError(f"{what}: the seed label map has no labelled voxel; draw the structure on at least one slice")
    return checked


def load_case(image_path: Path, seeds_path: Path, axis: str = "axial", seed_slices: list[int] | None = None,
              log: Callable[[str], None] = print, allow_uneven: bool = False) -> Case:
    image = read_image(image_path, allow_uneven)
    seeds_image = read_label_map(seeds_path)
    check_same_grid(image, seeds_image, what=f"seed label map {Path(seeds_path).name}")
    array_axis = slice_axis(image, axis)
    # a read-only view of the image's voxels, not a copy (300 MB for 512 x 512 x 300 float32); Case keeps the image
    volume = np.moveaxis(sitk.GetArrayViewFromImage(image), array_axis, 0)
    seeds = np.ascontiguousarray(np.moveaxis(sitk.GetArrayFromImage(seeds_image), array_axis, 0))
    checked = check_seed_map(seeds, str(seeds_path))
    if seed_slices is not None:
        outside = [z for z in seed_slices if not 0 <= z < seeds.shape[0]]
        if outside:
            raise UserError(f"--seed-slices {outside}: outside 0..{seeds.shape[0] - 1}")
        labelled = [int(z) for z in np.flatnonzero(seeds.any(axis=(1, 2)))]
        empty = [z for z in seed_slices if z not in labelled]
        if len(empty) == len(seed_slices):
            raise UserError(f"--seed-slices: none of slices {empty} carries a label in {Path(seeds_path).name}; "
                            f"its labelled slices are {labelled}")
        if empty:
            log(f"--seed-slices: slices {empty} carry no label and are not prompts")
        keep = np.zeros(seeds.shape[0], bool)
        keep[list(seed_slices)] = True
        checked = Seeds(np.where(keep[:, None, None], seeds, 0))
    return Case(image, array_axis, volume, checked)


def find_weights(options: PropagateOptions, log: Callable[[str], None], progress=False) -> Path | None:
    """The checkpoint to use, or None when method 'auto' has to do without (after saying why)."""
    if options.checkpoint is not None:
        if not Path(options.checkpoint).is_file():
            raise UserError(f"checkpoint {options.checkpoint}: no such file")
        return Path(options.checkpoint)
    spec = get_model(options.model)
    try:
        if is_cached(spec) or options.download:
            if not is_cached(spec):
                log(f"downloading {spec.name} weights ({spec.size_bytes / 1e6:.0f} MB) to {cached_path(spec)}")
            return ensure_weights(spec, progress=progress)
        raise UserError(f"{spec.name} weights are not downloaded and downloading is off; {manual_install_hint(spec)}")
    except UserError as exc:
        if options.method == "sam2":
            raise
        log(f"no SAM2 weights: {exc}")
    log("using --method interpolate (ITK morphological contour interpolation between the drawn slices) instead of SAM2")
    return None


def propagate_case(case: Case, options: PropagateOptions, weights: Path | None,
                   progress: Progress | None = None, log: Callable[[str], None] = print
                   ) -> tuple[Propagation, str, str | None]:
    """Run the chosen method; returns the result, the method used and the device (SAM2 only)."""
    if options.method == "interpolate" or weights is None:
        from sslmedsam2.propagation.interpolation import interpolate_between_seeds

        return interpolate_between_seeds(case.seeds), "interpolate", None
    from sslmedsam2.models.loader import build_predictor, resolve_device
    from sslmedsam2.propagation.sam2_propagation import propagate_sam2

    device = resolve_device(options.device)
    predictor = build_predictor(get_model(options.model), weights, device, options.image_size, options.compile, log)
    slices = to_uint8(case.volume, options.intensity)
    return propagate_sam2(predictor, slices, case.seeds, progress), "sam2", str(device)


def run_propagate(image_path: Path, seeds_path: Path, output: Path, options: PropagateOptions,
                  log: Callable[[str], None] = print, progress: Progress | None = None,
                  download_progress=False, overwrite: bool = False) -> PropagateReport:
    """Check everything that can be checked before the long work; write nothing unless all of it succeeds.
    Existing outputs not written by this tool are replaced only with `overwrite`."""
    if options.method not in METHODS:
        raise UserError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    get_model(options.model)
    if options.image_size is not None:
        check_image_size(options.image_size)
    if options.method == "interpolate":
        from sslmedsam2.propagation.interpolation import WORKER

        WORKER.start()  # ITK loads (seconds) while the inputs are read and checked
    output, inputs = Path(output), (Path(image_path), Path(seeds_path))
    check_output(output, inputs, overwrite)
    confidence = confidence_path(output)
    check_table_output(confidence, inputs, overwrite)
    started = time.perf_counter()
    case = load_case(*inputs, options.axis, options.seed_slices, log, options.allow_uneven)
    check_geometry_fits(case.image, output, what=str(image_path))
    weights = None if options.method == "interpolate" else find_weights(options, log, download_progress)
    result, method, device = propagate_case(case, options, weights, progress, log)
    write_result(case.to_image(result.labels), output, result.confidence)
    return PropagateReport(method, output, confidence, case.seeds.labels, case.volume.shape[0],
                           time.perf_counter() - started, options.model if method == "sam2" else None, device)
