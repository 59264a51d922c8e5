"""Stage timers for the benchmarks: wrap engine functions so each run reports where its time went.

A stage's time is exclusive: time spent in another timed function called from it counts for that one (encoding
inside tracking counts as encoding). With `sync` (torch.cuda.synchronize on a GPU) a stage ends when the work it
queued has finished, not when its host code returns; the run itself never waits more for it, as the next stage
would wait anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Stages:
    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per active call: [start, time spent in nested timed calls]

    def wrap(self, owner, name: str, stage: str | None = None) -> None:
        """Replace owner.name (a module function or a class's method) by a timed wrapper counted as `stage`."""
        original = getattr(owner, name)
        stage = stage or name

        def timed(*args, **kwargs):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return original(*args, **kwargs)
            finally:
                if self.sync is not None:
                    self.sync()
                start, nested = self._stack.pop()
                spent = time.perf_counter() - start
                self.seconds[stage] = self.seconds.get(stage, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1][1] += spent

        setattr(owner, name, timed)

    def get(self, stage: str) -> float:
        return self.seconds.get(stage, 0.0)
