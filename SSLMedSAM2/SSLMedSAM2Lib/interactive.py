"""Propagation through a `sslmedsam2 serve` session, off the GUI thread. No Slicer and no Qt here.

EngineWorker: one persistent thread runs the client calls, one task at a time; what a task reports (progress,
messages, its result or error) waits in a queue until the GUI thread calls `pump()` (the module's QTimer), so
every GUI update happens on the main thread. Inside Slicer the main thread holds Python's GIL while Qt's event loop
runs (PythonQt is initialised without thread support), so a Python thread runs only while the main thread runs
Python: each `pump()` also yields the GIL to the worker.

InteractiveEngine: the connection (the module's local server, or a remote URL) and the open volume, an engine
session (sslmedsam2.session.remote.RemoteSession). The volume is sent once and reused while it is unchanged; each
propagation sends the prompt slices (replacing the session's prompts, so an Undo in the panel never leaves stale
prompts on the server). A session lost to a restarted or expired server is opened again by the session itself; a
local server that died is started again here, once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from SSLMedSAM2Lib.parameters import Connection, EngineSettings
from SSLMedSAM2Lib.server_process import LocalServer, ServerStartError
from sslmedsam2.jobs import Cancelled, JobControl


class Reporter(JobControl):
    """Given to a task on the worker thread: the engine's job protocol (progress, cancel request), whose reports
    and messages are posted to the GUI thread."""

    def __init__(self, post: Callable[[str, object], None]) -> None:
        super().__init__()
        self._post = post

    def message(self, text: str) -> None:
        self._post("message", text)

    def progress(self, done: int, total: int) -> None:
        self._post("progress", (int(done), int(total)))

    def on_progress(self) -> None:
        self.progress(self.done, self.total or 0)


@dataclass
class _Task:
    work: Callable[[Reporter], object]
    on_done: Callable[[object, BaseException | None], None]
    on_progress: Callable[[int, int], None]
    on_message: Callable[[str], None]
    reporter: Reporter | None = None  # its progress, messages and cancel request (set by EngineWorker.submit)


class EngineWorker:
    """One persistent thread for every client call of the module (started on first use, daemon)."""

    def __init__(self) -> None:
        self._tasks: queue.Queue[_Task | None] = queue.Queue()
        self._events: queue.Queue[tuple[_Task, str, object]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._live: list[_Task] = []  # submitted tasks whose end was not delivered yet

    @property
    def busy(self) -> bool:
        return bool(self._live)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def submit(self, work: Callable[[Reporter], object], on_done: Callable[[object, BaseException | None], None],
               on_progress: Callable[[int, int], None] = lambda done, total: None,
               on_message: Callable[[str], None] = lambda text: None) -> None:
        """Run `work(reporter)` on the worker thread; the callbacks run later, in `pump()`, on the caller's thread."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="SSLMedSAM2-engine-client", daemon=True)
            self._thread.start()
        task = _Task(work, on_done, on_progress, on_message)
        task.reporter = Reporter(lambda kind, payload: self._events.put((task, kind, payload)))
        self._live.append(task)
        self._tasks.put(task)

    def cancel(self) -> None:
        """Ask every task not finished yet to stop: a running one cancels its server job at its next poll, a queued
        one never starts (inside Slicer the worker may not have had its turn yet)."""
        for task in list(self._live):
            task.reporter.cancel()

    def pump(self) -> bool:
        """On the GUI thread: let the worker run, then deliver what it reported. Returns whether work is pending."""
        time.sleep(0)  # releases the GIL: the worker thread gets its turn
        while True:
            try:
                task, kind, payload = self._events.get_nowait()
            except queue.Empty:
                return self.busy
            if kind == "message":
                task.on_message(payload)
            elif kind == "progress":
                task.on_progress(*payload)
            else:
                self._live.remove(task)
                result, error = payload
                task.on_done(result, error)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread once the tasks already submitted have run (a last one, such as closing the session, is
        not cancelled: cancel() first what should not run), waiting up to `timeout` seconds. It is a daemon:
        Slicer's exit never waits longer for it."""
        if self._thread is not None and self._thread.is_alive():
            self._tasks.put(None)
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            reporter = task.reporter
            try:
                if reporter.should_stop():
                    raise Cancelled("cancelled before it started")
                outcome = (task.work(reporter), None)
            except BaseException as exc:  # delivered to the GUI thread, never lost in the worker
                outcome = (None, exc)
            self._events.put((task, "done", outcome))


@dataclass
class VolumeSource:
    """The volume to propagate on: `key` names its content and how it is opened (a new key opens a new session);
    `data` is the image file's bytes, needed only when the engine does not hold this key yet."""

    key: tuple
    name: str
    axis: str
    modality: str
    data: bytes | None = None


@dataclass
class PropagationRequest:
    connection: Connection
    settings: EngineSettings
    volume: VolumeSource
    seeds: np.ndarray  # (k, j, i) label map on the volume's grid, segment i as value i + 1
    prompt_slices: list[int]  # along the axis; the seeds on these slices are the prompts
    mode: str = "local"  # local: an edit re-tracks around the slices it changes; exact: every slice again
    undo: int = 0  # propagations undone in the panel since the last one: the session goes back as many first


@dataclass
class PropagationResult:
    labels: np.ndarray  # (k, j, i), values as in the seeds
    confidence: list  # the table's rows (sslmedsam2.labelmap.confidence.SliceConfidence)
    array_axis: int  # the numpy axis the server sliced along
    where: str  # which engine computed it, in words
    notes: list[str] = field(default_factory=list)  # what the user should know (a restart, a session sent again)
    retracked: tuple[int, ...] | None = None  # a local re-propagation: the slices it re-tracked


def prompt_planes(seeds: np.ndarray, array_axis: int, slices: list[int]) -> dict[int, np.ndarray]:
    """The prompt slices as (h, w) planes along the session's axis; slices without a label are left out."""
    along = np.moveaxis(seeds, array_axis, 0)
    planes = {int(z): np.ascontiguousarray(along[z]) for z in slices if 0 <= z < len(along) and along[z].any()}
    if not planes:
        raise ValueError("none of the prompt slices carries a label: draw the structures on a few slices first")
    return planes


def _health(url: str, token_file: Path | None) -> None:
    from sslmedsam2.remote.client import Client

    client = Client(url, token_file=token_file, timeout=5)
    try:
        client.health()
    finally:
        client.close()


class InteractiveEngine:
    """Runs on the worker thread only; `holds()` is read by the GUI thread between tasks."""

    def __init__(self, local: LocalServer) -> None:
        self.local = local
        self._client = None
        self._client_key: tuple | None = None
        self._volume = None  # the open engine session (RemoteSession)
        self._volume_key: tuple | None = None
        self._data: bytes | None = None  # the bytes of the volume last sent, to open it again on another server
        self._data_key: tuple | None = None

    @staticmethod
    def _key(source: VolumeSource, connection: Connection) -> tuple:
        return (connection.engine, connection.url, *source.key)

    def holds(self, key: tuple, connection: Connection) -> bool:
        """Whether this volume was sent to this engine already (then it need not be exported again)."""
        return self._data is not None and self._data_key == (connection.engine, connection.url, *key)

    def _connect(self, request: PropagationRequest, reporter: Reporter, notes: list[str]):
        from sslmedsam2.remote.client import Client

        connection = request.connection
        if connection.engine == "local":
            started, died = self.local.starts, self.local.starts and not self.local.alive()
            why = self.local.failure() if died else None  # its log is deleted when the new one starts
            url = self.local.ensure(request.settings, reporter.message, reporter.should_stop, _health,
                                    reporter.progress, connection.command)
            if died and self.local.starts > started:
                notes.append("the local engine had stopped" + (f" ({why})" if why else "")
                             + "; it was started again and the volume sent again")
            key, token_file = ("local", url), self.local.token_file
        else:
            key, token_file = ("remote", connection.url, connection.token_file), connection.token_file or None
        if self._client is None or self._client_key != key:
            self._drop_session()
            self._forget_client()
            self._client, self._client_key = Client(key[1], token_file=token_file), key
        return self._client

    def _open(self, client, request: PropagationRequest, reporter: Reporter):
        source, settings = request.volume, request.settings
        key = self._key(source, request.connection)
        if self._volume is not None and self._volume_key == key:
            return self._volume
        data = source.data if source.data is not None else (self._data if self._data_key == key else None)
        if data is None:
            raise RuntimeError("the volume changed since it was exported; propagate again")
        from sslmedsam2.session.remote import RemoteSession

        self._drop_session()
        reporter.message(f"sending the volume ({len(data) / 1e6:.0f} MB) to the engine...")
        self._volume = RemoteSession(client, data, source.name, axis=source.axis, modality=source.modality,
                                     model=settings.model, image_size=settings.image_size or None)
        self._volume_key, self._data, self._data_key = key, data, key
        return self._volume

    def _drop_session(self) -> None:
        """Close the open session (its data is deleted on the server); a server already gone is fine."""
        volume, self._volume, self._volume_key = self._volume, None, None
        if volume is not None:
            try:
                volume.close()
            except Exception:  # unreachable, or any refusal: the server's idle expiry deletes it anyway
                pass

    def propagate(self, request: PropagationRequest, reporter: Reporter) -> PropagationResult:
        """Blocks: call it on the worker thread."""
        from sslmedsam2.remote.client import ServerError, ServerUnreachable

        notes: list[str] = []
        if request.connection.engine == "remote" and request.settings.checkpoint:
            notes.append("the local checkpoint file is not used by a remote engine (it uses its own weights)")
        for attempt in (1, 2):
            try:
                volume = self._open(self._connect(request, reporter, notes), request, reporter)
                if reporter.should_stop():  # pressed while the volume was on its way
                    raise Cancelled("cancelled before the propagation began")
                for _ in range(request.undo if attempt == 1 else 0):
                    if volume.can_undo:
                        volume.undo()
                planes = prompt_planes(request.seeds, volume.grid.array_axis, request.prompt_slices)
                reporter.message(f"propagating from {len(planes)} slices...")
                result = volume.propagate(planes, replace=True, progress=reporter, should_stop=reporter.should_stop,
                                          mode=request.mode)
                break
            except ServerUnreachable:
                if attempt == 2 or request.connection.engine != "local" or self.local.alive():
                    raise
                reporter.message("the local engine stopped; starting it again")
                self._volume, self._volume_key = None, None
            except ServerError as exc:
                if exc.status == 401:  # the token file is read again next time (the person may correct it)
                    self._forget_client()
                raise
        notes.extend(result.notes)  # a session the server had lost, opened again
        axis = volume.grid.array_axis
        where = (f"the local engine ({self.local.url})" if request.connection.engine == "local"
                 else f"the engine at {request.connection.url}")
        return PropagationResult(np.moveaxis(result.labels, 0, axis), result.confidence, axis, where, notes,
                                 result.retracked)

    def _forget_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client, self._client_key = None, None

    def close(self) -> None:
        """Close the session and the client (the shared local server keeps running until Slicer exits)."""
        self._drop_session()
        self._data = self._data_key = None
        self._forget_client()


def user_message(error: BaseException, connection: Connection) -> str:
    """One line for the panel: the engine's own words, with where it runs."""
    from sslmedsam2.errors import UserError
    from sslmedsam2.remote.client import JobCancelled, ServerUnreachable

    if isinstance(error, (JobCancelled, Cancelled)):
        return "cancelled"
    if isinstance(error, ServerStartError):
        return f"the local engine did not start: {error}"
    if isinstance(error, ServerUnreachable) and connection.engine == "local":
        return f"the local engine does not answer: {error}"
    if isinstance(error, (UserError, ValueError, RuntimeError)) and str(error):  # the engine's own lines
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
