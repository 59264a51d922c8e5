"""What a session is, whichever engine holds it: its grid, its prompts, its last result, and one propagate()."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from sslmedsam2.jobs import Progress
from sslmedsam2.labelmap.confidence import SliceConfidence
from sslmedsam2.volume.slices import SliceGrid


@dataclass(frozen=True)
class SessionResult:
    """A propagation's result, slice-first along the session's axis."""

    labels: np.ndarray  # (n, h, w)
    confidence: list[SliceConfidence]
    number: int  # the session's result counter: 1 for its first propagation
    mark: str  # the provenance id of the files rendered from it (label map and table, one pair)
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())  # what the user should know (a server restarted, say)
    mode: str = "exact"  # exact: every slice tracked anew; local: only around the corrected slices
    retracked: tuple[int, ...] | None = None  # local: the slices re-tracked (the rest kept their previous result)

    @property
    def labels_present(self) -> list[int]:
        return sorted({r.label for r in self.confidence if r.present})

    @property
    def labels_seeded(self) -> list[int]:
        return sorted({r.label for r in self.confidence})


class EngineSession(Protocol):
    """An open volume. `prompts` are (h, w) label planes by slice index along the axis; `propagate` lays `update`
    over them (an all-zero plane removes that slice), or replaces them, tracks, and keeps the result. A failed or
    cancelled propagation leaves prompts and result as they were."""

    grid: SliceGrid
    prompts: dict[int, np.ndarray]
    result: SessionResult | None

    def propagate(self, update: dict[int, np.ndarray], replace: bool = True, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> SessionResult: ...

    def close(self) -> None: ...
