"""A session in this process: the volume's slices and their SAM2 features (kept between propagations), the prompts
and the last result. The command line uses one for a single propagation, the server one per open volume, refine's
SAM2 step one per case with one predictor for all."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from sslmedsam2.jobs import Progress
from sslmedsam2.provenance import new_result_id
from sslmedsam2.session.base import SessionResult
from sslmedsam2.session.prompts import merged, seed_map
from sslmedsam2.volume.slices import SliceVolume


class LocalSession:
    """`predictor`: the SAM2 predictor; or `build`, a function that gives it when the first propagation needs it (a
    server builds its models on its worker thread). `features_on`: where slice features are kept ("auto": the GPU
    while they fit, else main memory; None: not kept, each pass encodes what it reads, as sam2 does)."""

    def __init__(self, volume: SliceVolume, predictor=None, *, build: Callable[[], object] | None = None,
                 features_on: str | None = "auto") -> None:
        if (predictor is None) == (build is None):
            raise ValueError("give a predictor or a function that builds it")
        self.volume = volume
        self.grid = volume.grid
        self._predictor, self._build = predictor, build
        self._features_on = features_on
        self.tracker = None  # propagation.tracker.VolumeTracker: built with the predictor, dropped by close()
        self.prompts: dict[int, np.ndarray] = {}
        self.result: SessionResult | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    def predictor(self):
        """The predictor (built now, when it was given as a function)."""
        return self._predictor if self._build is None else self._build()

    def _ensure_tracker(self):
        from sslmedsam2.propagation.tracker import VolumeTracker

        predictor = self.predictor()
        if self.tracker is None or self.tracker.predictor is not predictor:
            self.tracker = VolumeTracker(predictor, self.volume.slices, self._features_on)
        return self.tracker

    # the slice features, which a server's memory budget manages
    def feature_bytes(self) -> int:
        return 0 if self.tracker is None else self.tracker.feature_bytes()

    def features_on(self) -> str | None:
        store = None if self.tracker is None else self.tracker.store
        return None if store is None else str(store.device)

    def features_to_main_memory(self) -> None:
        """Keep the features in main memory from now on (after the GPU ran out of memory)."""
        if self.tracker is not None and self.tracker.store is not None:
            self.tracker.store.move_to("cpu")

    def drop_features(self) -> None:
        """Release the features (eviction); the next propagation encodes again."""
        if self.tracker is not None:
            self.tracker.drop_features()

    def propagate(self, update: dict[int, np.ndarray], replace: bool = True, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> SessionResult:
        """See EngineSession.propagate. Raises Cancelled when `should_stop()` answers True (checked after every
        encoded chunk and tracking step)."""
        started = time.perf_counter()
        prompts = merged(self.prompts, update, replace)
        seeds = seed_map(prompts, self.shape)
        tracked = self._ensure_tracker().propagate(seeds, progress, should_stop)
        number = 1 if self.result is None else self.result.number + 1
        result = SessionResult(tracked.labels, tracked.confidence, number, new_result_id(),
                               time.perf_counter() - started)
        self.prompts, self.result = prompts, result  # together: a failure above leaves both as they were
        return result

    def close(self) -> None:
        self.tracker, self.prompts, self.result = None, {}, None
