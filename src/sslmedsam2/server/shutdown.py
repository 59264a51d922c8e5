"""How `serve` stops: a first request (SIGINT, SIGTERM, or standard input closing) stops it gracefully (the running
job is cancelled at its next step, HTTP closes, every session's data is deleted); a second request, or a graceful
stop that has not finished within `grace_s`, deletes the data at once and ends the process. A server holding patient
images must neither linger nor leave them behind."""

from __future__ import annotations

import faulthandler
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

STOP_GRACE_S = 45.0  # a step of the slowest job (one chunk of encoding on a CPU) takes seconds, not this long


class Shutdown:
    """`stop` (the graceful stop) and `data` (the folder to delete when forced) are set by serve; `exit` is
    os._exit unless a test says otherwise."""

    def __init__(self, stop: Callable[[], None], data: Callable[[], Path | None], say: Callable[[str], None],
                 grace_s: float = STOP_GRACE_S, exit: Callable[[int], None] = os._exit) -> None:
        self._stop, self._data, self._say, self._exit = stop, data, say, exit
        self.grace_s = grace_s
        self.requested = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()
        self._watchdog: threading.Timer | None = None

    def request(self, reason: str) -> None:
        """Safe from a signal handler and from any thread."""
        with self._lock:
            first = not self.requested.is_set()
            self.requested.set()
        if not first:
            self.force(f"{reason} again")
            return
        self._say(f"{reason}: stopping (send it again to stop at once)")
        self._watchdog = threading.Timer(self.grace_s, self._overdue)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._stop()

    def _overdue(self) -> None:
        if not self.finished.is_set():
            self._say(f"the graceful stop did not finish within {self.grace_s:.0f} s; where each thread is:")
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self.force("graceful stop overdue")

    def force(self, reason: str) -> None:
        if self.finished.is_set():
            return
        folder = self._data()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        self._say(f"{reason}: stopped at once; every session's data is deleted")
        sys.stderr.flush()
        self._exit(1)

    def done(self) -> None:
        self.finished.set()
        if self._watchdog is not None:
            self._watchdog.cancel()


def stop_when_closed(stream: BinaryIO, shutdown: Shutdown) -> threading.Thread:
    """Read `stream` (standard input) to its end, then stop: the parent that holds its other end has exited or
    died. Works the same on every platform, unlike signals."""

    def watch() -> None:
        try:
            while stream.read(65536):
                pass
        except (OSError, ValueError):
            pass
        shutdown.request("standard input closed (the program that started the server is gone)")

    thread = threading.Thread(target=watch, name="sslmedsam2-stdin-watch", daemon=True)
    thread.start()
    return thread
