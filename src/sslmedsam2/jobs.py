"""The one job protocol: how long work reports progress, is asked to stop, and fails in one line.

Used by the command line's bars, the server's jobs, refinement and the Slicer module's workers. No torch, no Qt:
the Slicer module and the thin client import it.
"""

from __future__ import annotations

import threading
from typing import Protocol

from sslmedsam2.errors import UserError, WorkerError


class Cancelled(Exception):
    """Work stopped at a safe point because it was asked to; nothing was written."""


class Progress(Protocol):
    """What long work reports to: a total (reset) and steps done (update). A tqdm bar fits."""

    def reset(self, total: int | None = None) -> object: ...
    def update(self, n: int = 1) -> object: ...


class JobControl:
    """A Progress that also carries a stop request: what a worker (a server job, a Slicer task, refinement) gives
    the work it runs. Thread-safe; `done`/`total` are read by whoever shows the progress."""

    def __init__(self) -> None:
        self.done = 0
        self.total: int | None = None
        self._stop = threading.Event()
        self._changed = threading.Condition()

    def reset(self, total: int | None = None) -> None:
        with self._changed:
            self.done, self.total = 0, total
        self.on_progress()

    def update(self, n: int = 1) -> None:
        with self._changed:
            self.done += n
        self.on_progress()

    def on_progress(self) -> None:
        """Called after every reset and update (a subclass relays them)."""

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def cancel(self) -> None:
        self._stop.set()

    @property
    def cancel_requested(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        """Raise Cancelled when a stop was asked for: the safe point of a loop."""
        if self._stop.is_set():
            raise Cancelled()


def out_of_memory(exc: BaseException) -> str | None:
    """'gpu' for torch's out-of-memory error (recognised without importing torch), 'main' for a MemoryError,
    None for anything else."""
    if isinstance(exc, MemoryError):
        return "main"
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, by name: torch-free callers need not import torch
        return "gpu"
    return None


_REMEDIES = {
    "command": {"gpu": "lower --image-size or use --device cpu", "main": "lower --image-size or close other programs"},
    "server": {"gpu": "open a smaller image size, or start the server with --device cpu",
               "main": "open a smaller image size, or close other sessions"},
}


def failure_line(exc: BaseException, where: str = "command") -> str | None:
    """The one line a failure is reported with, in the command line's words (`where`: 'command' or 'server', which
    changes only what an out-of-memory message advises); None for a failure that is a bug (report it whole)."""
    if isinstance(exc, (UserError, WorkerError)):
        return str(exc)
    memory = out_of_memory(exc)
    if memory is not None:
        what = "GPU memory" if memory == "gpu" else "memory"
        place = " on the server" if where == "server" else ""
        return f"out of {what}{place}: {_REMEDIES[where][memory]}"
    return None
