"""A volume's slices as SAM2 frames, with their image features encoded once and kept: tracking again after an edit
runs only the tracking. The engine session (sslmedsam2.session.local) keeps one per open volume."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.propagation.features import FeatureStore, feature_device, frame_feature_bytes
from sslmedsam2.propagation.predictor import SlicePredictor
from sslmedsam2.jobs import Progress
from sslmedsam2.labelmap.result import Propagation
from sslmedsam2.propagation.local_edit import Retracked, retrack
from sslmedsam2.settings import EditRule
from sslmedsam2.propagation.sam2_propagation import Passes, fuse, track_passes
from sslmedsam2.labelmap.seeds import Seeds


class VolumeTracker:
    """One volume: its 8-bit slices (n, h, w) along the chosen axis and the image features of its slices."""

    def __init__(self, predictor: SlicePredictor, slices: np.ndarray,
                 features_on: torch.device | str | None = "auto") -> None:
        """`features_on`: where the features are kept ("auto": the GPU while they fit, else CPU memory; None: not
        kept, each pass encodes what it reads, as sam2 does)."""
        self.predictor = predictor
        self.frames = VolumeFrames(slices, predictor.image_size, predictor.device)
        if features_on == "auto":
            features_on = feature_device(predictor.device, predictor.image_size, len(self.frames))
        self.store = None if features_on is None else FeatureStore(features_on)

    @property
    def n_slices(self) -> int:
        return len(self.frames)

    @property
    def height(self) -> int:
        return self.frames.height

    @property
    def width(self) -> int:
        return self.frames.width

    def expected_feature_bytes(self) -> int:
        """What this volume's features take once every slice is encoded (float32)."""
        return frame_feature_bytes(self.predictor.image_size) * self.n_slices

    def feature_bytes(self) -> int:
        return 0 if self.store is None else self.store.nbytes()

    def drop_features(self) -> None:
        """Release the features (eviction); the next propagation encodes again."""
        if self.store is not None:
            self.store = FeatureStore(self.store.device)

    def propagate(self, seeds: Seeds, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Propagation:
        """Seeds on this volume's slice grid -> a label map and its confidence table. Raises Cancelled when
        `should_stop()` answers True (checked after every encoded chunk and tracking step)."""
        return self.track(seeds, progress, should_stop)[0]

    def track(self, seeds: Seeds, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None) -> tuple[Propagation, Passes]:
        """propagate(), with the passes it fused (what a later local re-propagation starts from)."""
        self._check(seeds)
        passes = track_passes(self.predictor, self.frames, seeds, progress, self.store, should_stop)
        return fuse(*passes.merged(), seeds, self.height, self.width), passes

    def retrack(self, seeds: Seeds, passes: Passes, previous: Propagation, starts: dict[int, list[int]],
                rule: EditRule, progress: Progress | None = None,
                should_stop: Callable[[], bool] | None = None) -> tuple[Propagation, Retracked]:
        """The local re-propagation (local_edit) of `passes` (those of `previous`) from the corrected slices
        `starts`: the new result, and what was re-tracked (its patch undoes the change to `passes`)."""
        self._check(seeds)
        done = retrack(self.predictor, self.frames, self.store, seeds, passes, starts, rule, progress, should_stop)
        part = fuse(*passes.merged(), seeds, self.height, self.width, targets=done.slices)
        labels = previous.labels.copy()
        labels[done.slices] = part.labels[done.slices]
        changed = set(done.slices)
        rows = [r for r in previous.confidence if r.slice not in changed] + part.confidence
        return Propagation(labels, sorted(rows, key=lambda r: (r.label, r.slice))), done

    def _check(self, seeds: Seeds) -> None:
        if seeds.labels_map.shape != (self.n_slices, self.height, self.width):
            raise ValueError(f"seeds of shape {seeds.labels_map.shape} for a volume of "
                             f"{(self.n_slices, self.height, self.width)}")
