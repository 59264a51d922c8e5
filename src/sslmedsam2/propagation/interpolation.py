"""The no-weights baseline: ITK's morphological contour interpolation between seed slices.

It is the filter behind Slicer's "Fill between slices", run in a worker process that stays alive (itk_worker).
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import tempfile
import threading

import numpy as np

from sslmedsam2.propagation.confidence import SliceConfidence
from sslmedsam2.propagation.itk_worker import _LENGTH, array_bytes, bytes_array, read_exactly, write_frame
from sslmedsam2.propagation.result import Propagation
from sslmedsam2.propagation.seeds import Seeds


class ContourWorker:
    """The ITK process: started once (about 10 s to load ITK), then each request costs the filter alone.

    A crash of the worker fails only the request it was serving; the next request starts a new worker.
    """

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._ready = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start loading ITK in the background (returns at once); requests wait until it is ready."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([sys.executable, "-m", "sslmedsam2.propagation.itk_worker"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._ready = False

    def _answer(self) -> tuple[int, bytes]:
        status = read_exactly(self._process.stdout, 1)[0]
        size = _LENGTH.unpack(read_exactly(self._process.stdout, _LENGTH.size))[0]
        return status, read_exactly(self._process.stdout, size)

    def interpolate(self, seeds_map: np.ndarray) -> np.ndarray:
        with self._lock:
            self._start()
            try:
                if not self._ready:
                    self._answer()
                    self._ready = True
                write_frame(self._process.stdin, array_bytes(seeds_map))
                status, payload = self._answer()
            except (EOFError, BrokenPipeError, OSError):
                raise RuntimeError(f"contour interpolation failed: {self._died()}") from None
        if status != 0:
            raise RuntimeError(f"contour interpolation failed: {payload.decode(errors='replace')}")
        return bytes_array(payload)

    def _died(self) -> str:
        process, self._process = self._process, None
        code = process.wait()
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines()
        return f"the ITK worker stopped (exit {code}): {lines[-1] if lines else 'no message'}"

    def close(self) -> None:
        with self._lock:
            if self._process is not None:
                self._process.stdin.close()
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                self._process = None


WORKER = ContourWorker()
atexit.register(WORKER.close)


def interpolate_between_seeds(seeds: Seeds) -> Propagation:
    """Fill every slice between the first and last seed of each label; slices outside stay empty."""
    dtype = np.uint8 if max(seeds.labels) < 256 else np.uint16
    out = seeds.impose(WORKER.interpolate(seeds.labels_map.astype(dtype)))
    rows = []
    for label, drawn in seeds.seed_slices().items():
        for z in range(out.shape[0]):
            voxels = int((out[z] == label).sum())
            if z in drawn:
                rows.append(SliceConfidence(z, label, "seed", True, voxels, 1.0, 1.0, 1.0, 1.0))
            else:
                rows.append(SliceConfidence(z, label, "interpolated", voxels > 0, voxels))
    return Propagation(out, rows)
