"""The no-weights baseline: ITK's morphological contour interpolation between seed slices.

It is the filter behind Slicer's "Fill between slices", run in a separate process (see itk_worker).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sslmedsam2.propagation.confidence import SliceConfidence
from sslmedsam2.propagation.result import Propagation
from sslmedsam2.propagation.seeds import Seeds


def _run_worker(seeds_map: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="sslmedsam2-itk-") as tmp:
        source, target = Path(tmp, "seeds.npy"), Path(tmp, "filled.npy")
        np.save(source, seeds_map)
        done = subprocess.run([sys.executable, "-m", "sslmedsam2.propagation.itk_worker", str(source), str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0 or not target.exists():
            tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"contour interpolation failed (exit {done.returncode}): {tail}")
        return np.load(target)


def interpolate_between_seeds(seeds: Seeds) -> Propagation:
    """Fill every slice between the first and last seed of each label; slices outside stay empty."""
    dtype = np.uint8 if max(seeds.labels) < 256 else np.uint16
    out = seeds.impose(_run_worker(seeds.labels_map.astype(dtype)))
    rows = []
    for label, drawn in seeds.seed_slices().items():
        for z in range(out.shape[0]):
            voxels = int((out[z] == label).sum())
            if z in drawn:
                rows.append(SliceConfidence(z, label, "seed", True, voxels, 1.0, 1.0, 1.0, 1.0))
            else:
                rows.append(SliceConfidence(z, label, "interpolated", voxels > 0, voxels))
    return Propagation(out, rows)
