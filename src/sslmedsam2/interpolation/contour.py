"""The no-weights baseline: ITK's morphological contour interpolation between seed slices.

It is the filter behind Slicer's "Fill between slices". ITK never shares a process with SimpleITK (itk_worker), and
loading it costs about 10 s, so the filter runs in a worker that stays alive: the user's shared worker, which
outlives each command (shared_worker), or, on Windows or with SSLMEDSAM2_ITK_WORKER=child, a child of this process.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from sslmedsam2.errors import UserError, WorkerError
from sslmedsam2.interpolation import shared_worker
from sslmedsam2.labelmap.confidence import SliceConfidence
from sslmedsam2.interpolation.itk_worker import array_bytes, bytes_array, read_answer, write_frame
from sslmedsam2.labelmap.result import Propagation
from sslmedsam2.labelmap.seeds import Seeds

MODE_ENV = "SSLMEDSAM2_ITK_WORKER"
MODES = ("shared", "child")


class ChildWorker:
    """The ITK process of this process alone: started once (about 10 s to load ITK), ended with it.

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
        self._process = subprocess.Popen([sys.executable, "-m", "sslmedsam2.interpolation.itk_worker"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr)
        self._ready = False

    def interpolate(self, seeds_map: np.ndarray) -> np.ndarray:
        """One request; WorkerError (one line) when the filter fails or the worker dies."""
        with self._lock:
            self._start()
            try:
                if not self._ready:
                    read_answer(self._process.stdout)
                    self._ready = True
                write_frame(self._process.stdin, array_bytes(seeds_map))
                status, payload = read_answer(self._process.stdout)
            except (EOFError, BrokenPipeError, OSError):
                raise WorkerError(f"contour interpolation failed: {self._died()}") from None
        if status != 0:
            raise WorkerError(f"contour interpolation failed: {payload.decode(errors='replace')}")
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


class ContourWorker:
    """The worker behind interpolate_between_seeds, chosen at each request (the environment may change).

    The shared worker where Unix sockets and a private folder are available; otherwise (or with
    SSLMEDSAM2_ITK_WORKER=child) a child of this process, which ends with it.
    """

    def __init__(self) -> None:
        self.child = ChildWorker()
        self._shared: dict[Path, shared_worker.SharedWorker] = {}
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def backend(self) -> ChildWorker | shared_worker.SharedWorker:
        """The worker the next request goes to: the shared one unless it is unavailable or unsafe, or not wanted."""
        mode = os.environ.get(MODE_ENV, "").strip().lower() or "shared"
        if mode not in MODES:
            raise UserError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
        if mode == "child" or not shared_worker.supported():
            return self.child
        try:
            directory = shared_worker.worker_directory()
            with self._lock:
                if directory not in self._shared:
                    self._shared[directory] = shared_worker.SharedWorker(directory)
                return self._shared[directory]
        except shared_worker.WorkerDirError as exc:
            self._refused(exc)
            return self.child

    def _refused(self, exc: Exception) -> None:
        if str(exc) not in self._warned:  # once per problem: the command still works, only slower
            self._warned.add(str(exc))
            print(f"sslmedsam2: warning: {exc}; ITK runs in a worker of this command only (make the folder "
                  f"private, or set {MODE_ENV}=child to silence this)", file=sys.stderr, flush=True)

    def start(self) -> None:
        """Start loading ITK (or find the shared worker) in the background; returns at once."""
        self.backend().start()

    def interpolate(self, seeds_map: np.ndarray) -> np.ndarray:
        """ITK's interpolation of a slice-first label map; WorkerError (one line) when the worker fails."""
        backend = self.backend()
        try:
            return backend.interpolate(seeds_map)
        except shared_worker.WorkerDirError as exc:  # the folder or the socket's owner changed since: not trusted
            self._refused(exc)
            return self.child.interpolate(seeds_map)

    def close(self) -> None:
        """End this process's child worker; the shared one ends by itself when idle."""
        self.child.close()


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
