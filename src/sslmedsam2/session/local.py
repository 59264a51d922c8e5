"""A session in this process: the volume's slices and their SAM2 features (kept between propagations), the prompts
and the last result. The command line uses one for a single propagation, the server one per open volume, refine's
SAM2 step one per case with one predictor for all."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from sslmedsam2.errors import UserError
from sslmedsam2.jobs import Progress
from sslmedsam2.settings import EditRule, check_mode
from sslmedsam2.provenance import new_result_id
from sslmedsam2.session.base import SessionResult
from sslmedsam2.session.prompts import merged, seed_map
from sslmedsam2.volume.slices import SliceVolume


UNDO_DEPTH = 16  # propagations undo() can go back
FULL_UNDO = 2  # of those, exact ones (each keeps a whole set of passes: memory)


class LocalSession:
    """`predictor`: the SAM2 predictor; or `build`, a function that gives it when the first propagation needs it (a
    server builds its models on its worker thread). `features_on`: where slice features are kept ("auto": the GPU
    while they fit, else main memory; None: not kept, each pass encodes what it reads, as sam2 does)."""

    def __init__(self, volume: SliceVolume, predictor=None, *, build: Callable[[], object] | None = None,
                 features_on: str | None = "auto", rule: EditRule = EditRule()) -> None:
        if (predictor is None) == (build is None):
            raise ValueError("give a predictor or a function that builds it")
        self.volume = volume
        self.grid = volume.grid
        self._predictor, self._build = predictor, build
        self._features_on = features_on
        self.tracker = None  # propagation.tracker.VolumeTracker: built with the predictor, dropped by close()
        self.prompts: dict[int, np.ndarray] = {}
        self.result: SessionResult | None = None
        self.rule = rule.check()
        self._passes = None  # propagation.sam2_propagation.Passes of the result: where a local edit starts from
        self._history: list[tuple[dict, SessionResult, tuple]] = []  # what undo() restores, the latest last

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
                  should_stop: Callable[[], bool] | None = None, mode: str = "local") -> SessionResult:
        """See EngineSession.propagate. `mode` local: an edit re-tracks around the slices it changes
        (propagation.local_edit); exact, a first propagation, a removed prompt or another set of labels: the whole
        volume. Raises Cancelled when `should_stop()` answers True (checked after every encoded chunk and step)."""
        from sslmedsam2.labelmap.result import Propagation

        check_mode(mode)
        started = time.perf_counter()
        prompts = merged(self.prompts, update, replace)
        seeds = seed_map(prompts, self.shape)
        tracker = self._ensure_tracker()
        starts = None
        if mode == "local" and self.result is not None and self._passes is not None and tracker.store is not None \
                and self._passes.labels == seeds.labels:
            starts = corrections(self.prompts, prompts)
        if starts is None:
            tracked, passes = tracker.track(seeds, progress, should_stop)
            undo, retracked, mode = ("passes", self._passes), None, "exact"
        else:
            previous = Propagation(self.result.labels, self.result.confidence)
            tracked, done = tracker.retrack(seeds, self._passes, previous, starts, self.rule, progress, should_stop)
            passes, undo, retracked = self._passes, ("patch", done.patch), tuple(done.slices)
        number = 1 if self.result is None else self.result.number + 1
        result = SessionResult(tracked.labels, tracked.confidence, number, new_result_id(),
                               time.perf_counter() - started, mode=mode, retracked=retracked)
        if self.result is not None:
            self._remember(self.prompts, self.result, undo)
        self.prompts, self.result, self._passes = prompts, result, passes  # together: a failure leaves all as it was
        return result

    def _remember(self, prompts: dict, result: SessionResult, undo: tuple) -> None:
        """What undo() restores; at most UNDO_DEPTH steps, of which at most FULL_UNDO keep a whole set of passes."""
        self._history.append((prompts, result, undo))
        del self._history[:-UNDO_DEPTH]
        full = [i for i, (_, _, (kind, _)) in enumerate(self._history) if kind == "passes"]
        if len(full) > FULL_UNDO:
            del self._history[:full[-FULL_UNDO - 1] + 1]

    def undo(self) -> SessionResult:
        """Back to the previous result exactly (label map, confidence, prompts), as it was before the last
        propagation; UserError when there is nothing to undo."""
        if not self._history:
            raise UserError("nothing to undo: this session has no earlier result")
        prompts, result, (kind, saved) = self._history.pop()
        if kind == "patch":
            saved.restore(self._passes)
        else:
            self._passes = saved
        self.prompts, self.result = prompts, result
        return result

    @property
    def can_undo(self) -> bool:
        return bool(self._history)

    def close(self) -> None:
        self.tracker, self.prompts, self.result, self._passes, self._history = None, {}, None, None, []


def corrections(before: dict[int, np.ndarray], after: dict[int, np.ndarray]) -> dict[int, list[int]] | None:
    """{label: slices} where the prompts `after` add a drawing of the label or change it; None when a label lost
    a prompt slice (a removal: only the whole re-propagation is right then)."""
    starts: dict[int, list[int]] = {}
    for z in sorted(set(before) | set(after)):
        old, new = before.get(z), after.get(z)
        had = set() if old is None else {int(v) for v in np.unique(old) if v}
        has = set() if new is None else {int(v) for v in np.unique(new) if v}
        if had - has:
            return None
        for label in sorted(has):
            if old is None or not np.array_equal(old == label, new == label):
                starts.setdefault(label, []).append(z)
    return starts
