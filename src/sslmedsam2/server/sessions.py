"""A server session: one open volume's engine session (slices, features, prompts, last result) with what the server
keeps beside it: its owner, its folder, its current job, the files rendered from its result."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sslmedsam2.frames import IntensitySpec
from sslmedsam2.server.jobs import FINAL, Job
from sslmedsam2.session.local import LocalSession
from sslmedsam2.volume.slices import SliceVolume


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
    volume: SliceVolume
    engine: LocalSession
    outputs: dict[str, object] = field(default_factory=dict)  # the result as files, made when first asked for
    feature_bytes: int = 0
    features_on: str | None = None
    job: Job | None = None
    last_used: float = field(default_factory=time.monotonic)
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.volume.shape

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.state not in FINAL

    def describe(self) -> dict:
        result = self.engine.result
        return {"session": self.id, "name": self.name, "slices": self.shape[0], "height": self.shape[1],
                "width": self.shape[2], **self.volume.grid.describe(), "model": self.model,
                "image_size": self.image_size, "prompt_slices": sorted(self.engine.prompts),
                "result": 0 if result is None else result.number, "can_undo": self.engine.can_undo,
                "labels": [] if result is None else result.labels_seeded,
                "job": None if self.job is None else self.job.snapshot(), "feature_bytes": self.feature_bytes,
                "features_on": self.features_on, "idle_s": round(time.monotonic() - self.last_used, 1)}
