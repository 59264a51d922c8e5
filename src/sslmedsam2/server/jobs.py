"""Long operations as jobs: one worker thread runs them in order (one GPU), each reports progress, can be
cancelled, and ends with a one-line error rather than taking the server down."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
import traceback
from collections.abc import Callable

from sslmedsam2.jobs import Cancelled, JobControl, failure_line

FINAL = ("done", "failed", "cancelled")
log = logging.getLogger("sslmedsam2.server")


def failure_message(exc: BaseException) -> str:
    """The one line a failed job reports, in the words of the command line's own error lines."""
    line = failure_line(exc, "server")
    if line is not None:
        return line
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return f"internal error: {detail} (the server keeps running; see its log)"


class Job(JobControl):
    """One queued operation; it is also the Progress and the stop request its work is given."""

    def __init__(self, kind: str, owner: str, session: str | None, work: Callable[["Job"], object]) -> None:
        super().__init__()
        self.id = secrets.token_urlsafe(12)
        self.kind, self.owner, self.session = kind, owner, session
        self.work = work
        self.state = "queued"
        self.error: str | None = None
        self.result: object = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None

    def _finish(self, state: str, error: str | None = None, result: object = None) -> None:
        with self._changed:
            self.state, self.error, self.result = state, error, result
            self.work = None  # what it held (a session's volume, a seed map) is not kept as long as the job
            self.finished = time.time()
            self._changed.notify_all()

    def wait(self, timeout: float) -> None:
        """Block until the job ends or `timeout` seconds pass."""
        with self._changed:
            self._changed.wait_for(lambda: self.state in FINAL, timeout=max(0.0, timeout))

    def snapshot(self) -> dict:
        with self._changed:
            end = self.finished or time.time()
            return {"job": self.id, "kind": self.kind, "session": self.session, "state": self.state,
                    "done": self.done, "total": self.total, "error": self.error,
                    "cancel_requested": self.cancel_requested,
                    "seconds": None if self.started is None else round(end - self.started, 3)}


class JobRunner:
    """A single worker and the jobs it knows (finished ones are kept `retention_s` seconds). The worker is a thread
    of its own, or (own_thread=False) whichever thread calls run(): `serve` computes on the main thread, where
    torch's CPU kernels run faster than on other threads."""

    def __init__(self, retention_s: float = 3600.0, own_thread: bool = True) -> None:
        self.retention_s = retention_s
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = None
        if own_thread:
            self._thread = threading.Thread(target=self.run, name="sslmedsam2-worker", daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def active(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state not in FINAL]

    def forget_finished(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            for key in [k for k, j in self._jobs.items() if j.finished and now - j.finished > self.retention_s]:
                del self._jobs[key]

    def stop(self) -> None:
        """Cancel what runs or waits and end run() after the current job's next step."""
        for job in self.active():
            job.cancel()
        self._queue.put(None)

    def close(self, timeout: float = 30.0) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """Run the jobs in order on the calling thread, until stop()."""
        while True:
            try:  # wake up now and then: a signal the OS gave another thread is handled only when this one runs
                job = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if job is None:
                return
            if job.cancel_requested:
                job._finish("cancelled", "cancelled before it started")
                continue
            with job._changed:
                job.state, job.started = "running", time.time()
            try:
                result = job.work(job)
            except Cancelled:
                job._finish("cancelled", "cancelled")
            except Exception as exc:  # a job's failure is its own; the worker goes on
                if failure_line(exc, "server") is None:
                    log.error("job %s failed:\n%s", job.id, traceback.format_exc())
                job._finish("failed", failure_message(exc))
            else:
                job._finish("done", None, result)
