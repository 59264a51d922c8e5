"""A session's state: one open volume, its prompts, the engine object holding its slice features, its last result
and its current job."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslmedsam2.frames import IntensitySpec
from sslmedsam2.propagation.result import Propagation
from sslmedsam2.server.jobs import FINAL, Job
from sslmedsam2.server.upload import Volume


@dataclass
class Session:
    id: str
    owner: str
    name: str
    folder: Path
    axis: str
    model: str
    image_size: int
    intensity: IntensitySpec
    volume: Volume
    engine: object = None  # the VolumeSession (built on the worker thread at the first propagation)
    prompts: dict[int, np.ndarray] = field(default_factory=dict)
    result: Propagation | None = None
    result_id: int = 0
    result_mark: str | None = None  # the result's id in the files rendered from it (label map and table pair)
    outputs: dict[str, object] = field(default_factory=dict)  # the result as files, made when first asked for
    feature_bytes: int = 0
    features_on: str | None = None
    job: Job | None = None
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.slices.shape)

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.state not in FINAL

    def describe(self) -> dict:
        v = self.volume
        return {"session": self.id, "name": self.name, "slices": self.shape[0], "height": self.shape[1],
                "width": self.shape[2], "axis": self.axis, "array_axis": v.array_axis, "size": list(v.size),
                "spacing": list(v.spacing), "origin": list(v.origin), "direction": list(v.direction),
                "model": self.model, "image_size": self.image_size, "prompt_slices": sorted(self.prompts),
                "result": self.result_id, "labels": [] if self.result is None else labels_of(self.result),
                "job": None if self.job is None else self.job.snapshot(), "feature_bytes": self.feature_bytes,
                "features_on": self.features_on, "idle_s": round(time.monotonic() - self.last_used, 1)}


def labels_of(result: Propagation) -> list[int]:
    return sorted({r.label for r in result.confidence})
