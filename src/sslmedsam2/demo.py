"""`sslmedsam2 demo`: the main job on the shipped hippocampus sample, scored against its manual label."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.labelmap import pictures
from sslmedsam2.metrics import score_labels
from sslmedsam2.session.files import run_propagate
from sslmedsam2.settings import EngineSettings
from sslmedsam2.jobs import Progress
from sslmedsam2.volume import slice_axis

CASE = "hippocampus_001"
AXIS = "coronal"  # the hippocampus's long axis runs front to back


def sample_path(kind: str) -> Path:
    """kind: image, label or seeds."""
    return Path(str(resources.files("sslmedsam2") / "sample" / f"{CASE}_{kind}.nii.gz"))


def draw_overview(image: sitk.Image, seeds: sitk.Image, result: sitk.Image, truth: sitk.Image, target: Path,
                  title: str, axis: str = AXIS, columns: int = 5) -> None:
    """Non-seed slices across the structure: manual outline (white) over the result (colour)."""
    pictures.draw_overview(image, result, truth, target, title, axis, columns=columns, avoid=seeds)


def run_demo(output_dir: Path, settings: EngineSettings, log: Callable[[str], None] = print,
             progress: Progress | None = None, download_progress=False) -> dict[int, float]:
    """Propagate the sample's seeds, print Dice per label against the manual label, draw overview.png."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result_path = output_dir / f"{CASE}_result.nii.gz"
    report = run_propagate(sample_path("image"), sample_path("seeds"), result_path, settings.but(axis=AXIS), log,
                           progress, download_progress)
    truth, result = sitk.ReadImage(str(sample_path("label"))), sitk.ReadImage(str(result_path))
    scores = score_labels(sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(truth), tuple(reversed(truth.GetSpacing())))
    method = f"SAM2 {report.model}" if report.method == "sam2" else "contour interpolation (no SAM2 weights)"
    seeds = sitk.ReadImage(str(sample_path("seeds")))
    seeded = int(np.moveaxis(sitk.GetArrayFromImage(seeds), slice_axis(seeds, AXIS), 0).any(axis=(1, 2)).sum())
    summary = ", ".join(f"label {s.label}: Dice {s.dice:.3f}, HD95 {s.hd95:.1f} mm" for s in scores)
    log(f"demo ({method}, {seeded} drawn of {report.slices} coronal slices): {summary}")
    draw_overview(sitk.ReadImage(str(sample_path("image"))), seeds, result, truth, output_dir / "overview.png",
                  f"MSD hippocampus 001: {method} from {seeded} drawn coronal slices; white = manual outline\n{summary}")
    log(f"wrote {result_path}, {report.confidence.name} and overview.png in {output_dir}")
    return {s.label: s.dice for s in scores}
