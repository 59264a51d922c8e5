"""The interactive engine without HTTP: built models, open volumes (sessions) with their prompts, cached slice
features and last result, the propagation jobs, the memory budget and idle expiry. Every operation names the
owner (the token) it acts for; a session is visible to its owner only."""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sslmedsam2 import __version__
from sslmedsam2.atomic import temp_prefix, remove_stale_temporaries
from sslmedsam2.errors import UserError
from sslmedsam2.jobs import out_of_memory
from sslmedsam2.frames import IntensitySpec
from sslmedsam2.models import get_model
from sslmedsam2.models.registry import DEFAULT_MODEL, check_image_size
from sslmedsam2.models.cache import find_weights
from sslmedsam2.labelmap.confidence import write_confidence
from sslmedsam2.remote.wire import API_VERSION
from sslmedsam2.session.base import SessionResult
from sslmedsam2.session.local import LocalSession
from sslmedsam2.session.prompts import merged, seed_map
from sslmedsam2.settings import check_mode
from sslmedsam2.server import prompts as prompt_rules
from sslmedsam2.server.errors import Conflict, NotFound, SessionGone
from sslmedsam2.server.jobs import Job, JobRunner
from sslmedsam2.server.limits import FeatureBudget, ServerSettings, default_budget, human
from sslmedsam2.server.sessions import Session
from sslmedsam2.server.upload import read_volume_slices, store_upload
from sslmedsam2.volume import write_image

MAX_MODELS = 3  # built predictors kept (model, image size); the least recently used goes first
LABEL_FORMATS = {"nifti": ".nii.gz", "nrrd": ".nrrd"}
log = logging.getLogger("sslmedsam2.server")


class Service:
    def __init__(self, settings: ServerSettings, say: Callable[[str], None] = print, worker_thread: bool = True) -> None:
        settings.check()
        self.settings = settings
        self.say = say
        self.instance = secrets.token_hex(8)
        self.model = settings.model or DEFAULT_MODEL
        self.device = None
        self.budget: FeatureBudget | None = None
        self.root: Path | None = None
        self._sessions: dict[str, Session] = {}
        self._opening: Counter[str] = Counter()  # sessions being opened (their uploads read), by owner
        self._predictors: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.runner = JobRunner(settings.job_retention_s, own_thread=worker_thread)
        self._reaper: threading.Thread | None = None

    # --- life ---------------------------------------------------------------------------------------------------
    def start(self) -> "Service":
        """Check the model's weights and build it (errors here are the command line's own lines), make the private
        temporary folder, start expiring idle sessions."""
        import torch

        from sslmedsam2.propagation.device import resolve_device

        try:
            self.device = resolve_device(self.settings.device)  # the settings were checked when this was made
            self._predictor(self.model, self._image_size(self.model, None))
        except BaseException:
            self.runner.close()
            raise
        gpu_free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        self.budget = FeatureBudget(self.settings.memory_budget or default_budget(gpu_free))
        base = Path(self.settings.workdir or tempfile.gettempdir())
        remove_stale_temporaries(base)  # what a killed server of this host left: patient data must not linger
        self.root = Path(tempfile.mkdtemp(prefix=temp_prefix("sslmedsam2-server"), suffix=".tmp", dir=base))
        self._reaper = threading.Thread(target=self._expire_loop, name="sslmedsam2-expiry", daemon=True)
        self._reaper.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.runner.close()
        with self._lock:
            for session in list(self._sessions.values()):
                self._drop(session)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _expire_loop(self) -> None:
        interval = min(60.0, max(0.5, self.settings.idle_timeout_s / 4))
        while not self._stop.wait(interval):
            self.expire()

    def expire(self, now: float | None = None) -> list[str]:
        """Close the sessions unused for longer than the idle timeout (not while a job of theirs runs)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            old = [s for s in self._sessions.values()
                   if not s.busy and now - s.last_used > self.settings.idle_timeout_s]
            for session in old:
                self._drop(session)
        for session in old:
            self.say(f"session {session.id[:8]} expired after "
                     f"{self.settings.idle_timeout_s:.0f} s unused; its data is deleted")
        self.runner.forget_finished()
        return [s.id for s in old]

    # --- models -------------------------------------------------------------------------------------------------
    def _image_size(self, model: str, requested: int | None) -> int:
        if requested is not None:
            return check_image_size(int(requested))
        if self.settings.image_size is not None:
            return self.settings.image_size
        return get_model(model).image_size

    def _predictor(self, model: str, image_size: int):
        """A built predictor for (model, image size); runs on the worker thread (or at start)."""
        from sslmedsam2.propagation.builder import build_predictor

        key = (model, image_size)
        with self._lock:
            if key in self._predictors:
                self._predictors.move_to_end(key)
                return self._predictors[key]
        if model == self.model and self.settings.checkpoint is not None:
            weights = self.settings.checkpoint
        else:  # a download's bar (the Slicer module relays it)
            weights = find_weights(model, None, self.settings.download, True, self.say, progress=True)
        predictor = build_predictor(get_model(model), weights, self.device, image_size, self.settings.compile, self.say)
        with self._lock:
            self._predictors[key] = predictor
            while len(self._predictors) > MAX_MODELS:
                self._predictors.popitem(last=False)
        self.say(f"model {model} at image size {image_size} ready on {self.device}")
        return predictor

    # --- sessions -----------------------------------------------------------------------------------------------
    def _gone(self, session_id: str) -> str:
        return (f"no open session {session_id!r}: it was closed, expired after {self.settings.idle_timeout_s:.0f} s "
                "unused, or the server restarted; open the volume again")

    def _session(self, owner: str, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:
                raise SessionGone(self._gone(session_id))
            session.last_used = time.monotonic()
            return session

    def open_session(self, owner: str, data: bytes, name: str, axis: str = "axial", modality: str = "mri",
                     window: str = "soft-tissue", value_range: tuple[float, float] | None = None,
                     model: str | None = None, image_size: int | None = None, gzipped: bool = False) -> dict:
        # a name goes into one-line messages: no control characters
        name = "".join(c if c.isprintable() else "?" for c in Path(name or "image").name[:200]) or "image"
        model = model or self.model
        get_model(model)
        size = self._image_size(model, image_size)
        intensity = IntensitySpec(modality=modality, window=window,
                                  value_range=tuple(value_range) if value_range is not None else None)
        with self._lock:
            self._check_room(owner)
            self._opening[owner] += 1  # a place held while the upload is read: concurrent opens cannot overshoot
            session_id = secrets.token_urlsafe(16)
            folder = self.root / session_id
        try:
            folder.mkdir(mode=0o700)
            stored = store_upload(folder, data, name, gzipped, self.settings.max_voxels)
            volume = read_volume_slices(stored, name, axis, intensity, self.settings.max_voxels)
            from sslmedsam2.propagation.features import frame_feature_bytes

            self.budget.check_fits(frame_feature_bytes(size) * volume.shape[0], name)
            engine = LocalSession(volume, build=lambda: self._predictor(model, size), rule=self.settings.edit_rule)
            session = Session(session_id, owner, name, folder, axis, model, size, intensity, volume, engine)
            with self._lock:
                self._sessions[session_id] = session
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._opening[owner] -= 1
                if not self._opening[owner]:
                    del self._opening[owner]
        self.say(f"session {session_id[:8]} opened: {volume.shape[0]} slices of "
                 f"{volume.shape[1]} x {volume.shape[2]} ({axis}), {model} at {size}")
        return session.describe()

    def _check_room(self, owner: str) -> None:
        """Refuse (409) a session over the server's limit or over this owner's (token's) limit; under the lock."""
        held = len(self._sessions) + sum(self._opening.values())
        if held >= self.settings.max_sessions:
            raise Conflict(f"the server holds {held} open sessions, its limit; close one (or wait until one "
                           "expires) and open again")
        mine = sum(s.owner == owner for s in self._sessions.values()) + self._opening[owner]
        if mine >= self.settings.per_token_sessions:
            raise Conflict(f"your token holds {mine} open sessions, its limit (serve --max-sessions-per-token); "
                           "close one (or wait until one expires) and open again")

    def reserve_upload(self, held: int, size: int) -> None:
        """An upload being read counts `size` bytes, not `held`, against the memory budget; refused (413 or 507) when
        they cannot fit beside the other uploads in flight. Then make_room() gives the features they need."""
        with self._lock:
            self.budget.check_upload(size, self.budget.uploads - held)
            self.budget.uploads += size - held

    def make_room(self) -> None:
        """The least recently used sessions that are not busy give up their features until the budget holds."""
        self._make_room(None, 0)

    def release_upload(self, size: int) -> None:
        """An upload's bytes are read and decoded (or dropped): they no longer count against the budget. After the
        last upload in flight, the C allocator gives its free memory back to the system."""
        with self._lock:
            self.budget.uploads -= size
            last = self.budget.uploads == 0
        if last:  # on a thread of its own: trimming takes a while, and the caller is the event loop
            threading.Thread(target=_trim_heap, name="sslmedsam2-trim", daemon=True).start()

    def session_info(self, owner: str, session_id: str) -> dict:
        return self._session(owner, session_id).describe()

    def list_sessions(self, owner: str) -> list[dict]:
        with self._lock:
            return [s.describe() for s in self._sessions.values() if s.owner == owner]

    def close_session(self, owner: str, session_id: str) -> None:
        session = self._session(owner, session_id)
        with self._lock:
            self._drop(session)
        self.say(f"session {session_id[:8]} closed; its data is deleted")

    def abandon_session(self, owner: str, session_id: str) -> None:
        """Close a session whose client left without its id (before or without reading the answer), if still open."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:
                return
            self._drop(session)
        self.say(f"session {session_id[:8]} closed: its client left without the answer; its data is deleted")

    def _drop(self, session: Session) -> None:
        """Forget a session and delete its folder; a running job of it is cancelled and its result discarded."""
        self._sessions.pop(session.id, None)
        session.closed = True
        if session.job is not None:
            session.job.cancel()
        session.engine.close()  # a running propagation keeps what it needs until it ends, then is discarded
        session.outputs = {}
        shutil.rmtree(session.folder, ignore_errors=True)

    # --- propagation --------------------------------------------------------------------------------------------
    def propagate(self, owner: str, session_id: str, slices: list[dict], replace: bool = True,
                  mode: str = "local") -> dict:
        """Queue a propagation from the session's prompts (those of its last result) updated by, or replaced with,
        this request's slices (`mode`: see LocalSession.propagate); returns the job."""
        check_mode(mode)
        session = self._session(owner, session_id)
        update = prompt_rules.decode_slices(slices, session.shape)
        with session.lock:
            if session.busy:
                raise Conflict(f"session {session_id!r} is already propagating (job {session.job.id}); wait for it "
                               "or cancel it")
            seed_map(merged(session.engine.prompts, update, replace), session.shape)  # bad prompts: 400 now
            session.job = self.runner.submit(Job("propagate", owner, session_id,
                                                 lambda job: self._run_propagation(session, update, replace, mode,
                                                                                   job)))
            return session.job.snapshot()

    def _run_propagation(self, session: Session, update: dict, replace: bool, mode: str, job: Job) -> dict:
        """On the worker thread: the model, room for this volume's features, then the session's propagation."""
        from sslmedsam2.propagation.features import frame_feature_bytes

        if session.closed:
            raise SessionGone("the session was closed before its propagation started")
        self._predictor(session.model, session.image_size)  # built (or downloaded) first: a job's first step
        engine = session.engine
        need = frame_feature_bytes(session.image_size) * session.shape[0]
        if engine.feature_bytes() < need:  # none yet, or part of them (a cancelled run, an eviction)
            self._make_room(session, need)
        try:
            result = self._propagate_engine(session, update, replace, mode, job)
        finally:
            with self._lock:
                session.feature_bytes, session.features_on = engine.feature_bytes(), engine.features_on()
        if session.closed:
            raise SessionGone("the session was closed while it propagated; its result is discarded")
        with session.lock:
            session.outputs = {}
        return {"result": result.number, "labels": result.labels_seeded, "mode": result.mode,
                "retracked": None if result.retracked is None else list(result.retracked)}

    def undo(self, owner: str, session_id: str) -> dict:
        """Back to the session's previous result (and prompts), exactly; 409 while it propagates or when there is
        nothing to undo."""
        session = self._session(owner, session_id)
        with session.lock:
            if session.busy:
                raise Conflict(f"session {session_id!r} is propagating (job {session.job.id}); wait for it first")
            if not session.engine.can_undo:
                raise Conflict(f"session {session_id!r} has no earlier result to go back to")
            result = session.engine.undo()
            session.outputs = {}
        return {"result": result.number, "labels": result.labels_seeded, "can_undo": session.engine.can_undo}

    def _propagate_engine(self, session: Session, update: dict, replace: bool, mode: str, job: Job) -> SessionResult:
        engine = session.engine
        try:
            return engine.propagate(update, replace, progress=job, should_stop=job.should_stop, mode=mode)
        except Exception as exc:
            if out_of_memory(exc) != "gpu" or not (engine.features_on() or "").startswith("cuda"):
                raise
        # out of GPU memory: other volumes give up their features, this one's move to main memory, once
        import torch

        self.say(f"session {session.id[:8]}: out of GPU memory; keeping its features in main memory instead")
        self._make_room(session, self.budget.limit + 1)
        engine.features_to_main_memory()
        torch.cuda.empty_cache()
        return engine.propagate(update, replace, progress=job, should_stop=job.should_stop, mode=mode)

    def _make_room(self, session: Session | None, need: int) -> None:
        with self._lock:
            holders = [(s.id, s.feature_bytes, s.last_used, s.busy) for s in self._sessions.values()
                       if s is not session]
            victims = [self._sessions[key] for key in self.budget.victims(need, holders)]
            for victim in victims:
                victim.engine.drop_features()
                victim.feature_bytes, victim.features_on = 0, None
        for victim in victims:
            self.say(f"session {victim.id[:8]} gave up its slice features (memory budget "
                     f"{human(self.budget.limit)}); they are encoded again when it is next propagated")
        if victims and self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    # --- jobs ---------------------------------------------------------------------------------------------------
    def _job(self, owner: str, job_id: str) -> Job:
        job = self.runner.get(job_id)
        if job is None or job.owner != owner:
            raise NotFound(f"no job {job_id!r}: it ended more than {self.settings.job_retention_s:.0f} s ago, or "
                           "the server restarted")
        if job.session is not None:
            with self._lock:
                session = self._sessions.get(job.session)
                if session is not None:
                    session.last_used = time.monotonic()
        return job

    def job(self, owner: str, job_id: str, wait: float = 0.0) -> dict:
        job = self._job(owner, job_id)
        if wait > 0:
            job.wait(min(wait, 30.0))
        snapshot = job.snapshot()
        if job.state == "done":
            snapshot.update(job.result or {})
        return snapshot

    def cancel(self, owner: str, job_id: str) -> dict:
        job = self._job(owner, job_id)
        job.cancel()
        return job.snapshot()

    # --- results ------------------------------------------------------------------------------------------------
    def _result(self, owner: str, session_id: str) -> tuple[Session, SessionResult, int]:
        session = self._session(owner, session_id)
        with session.lock:
            result = session.engine.result
            if result is None:
                raise Conflict(f"session {session_id!r} has no result yet: propagate first")
            return session, result, result.number

    def labels_file(self, owner: str, session_id: str, fmt: str = "nifti") -> tuple[bytes, int]:
        """The label map on the image grid as a compressed file written by the engine's writer; (bytes, result)."""
        if fmt not in LABEL_FORMATS:
            raise UserError(f"unknown label map format {fmt!r}; choose one of {', '.join(LABEL_FORMATS)} or raw")
        session, result, result_id = self._result(owner, session_id)
        return self._rendered(session, (fmt, result_id), f"labels{LABEL_FORMATS[fmt]}",
                              lambda path: write_image(session.volume.to_image(result.labels), path,
                                                       result=result.mark),
                              Path.read_bytes), result_id

    def labels_array(self, owner: str, session_id: str) -> tuple[np.ndarray, int]:
        """The label map in slice-first order along the session's axis (n, h, w); (array, result)."""
        _, result, result_id = self._result(owner, session_id)
        return result.labels, result_id

    def confidence_csv(self, owner: str, session_id: str) -> tuple[str, int]:
        """The confidence table, as `propagate` writes it beside its output."""
        session, result, result_id = self._result(owner, session_id)
        return self._rendered(session, ("csv", result_id), "labels.confidence.csv",
                              lambda path: write_confidence(result.confidence, path, result.mark),
                              lambda path: path.read_text(encoding="utf-8")), result_id

    def _rendered(self, session: Session, key: tuple, filename: str, write: Callable[[Path], None],
                  read: Callable[[Path], object]):
        """An output written by the engine's own writer into the session's folder and read back, once per result.
        A session closed meanwhile (its folder deleted under the writer) answers as closed."""
        with session.lock:
            if session.closed:
                raise SessionGone(self._gone(session.id))
            cached = session.outputs.get(key)
            if cached is None:
                path = session.folder / filename
                try:
                    write(path)
                    cached = read(path)
                except (UserError, OSError):
                    if session.closed:
                        raise SessionGone(self._gone(session.id)) from None
                    raise
                finally:
                    path.unlink(missing_ok=True)
                session.outputs[key] = cached
            return cached

    # --- health ---------------------------------------------------------------------------------------------------
    def info(self, owner: str) -> dict:
        with self._lock:
            sessions = list(self._sessions.values())
            models = [{"name": m, "image_size": s} for m, s in self._predictors]
        memory = {"budget_bytes": self.budget.limit if self.budget else None,
                  "uploads_bytes": self.budget.uploads if self.budget else 0,
                  "features_bytes": sum(s.feature_bytes for s in sessions), "rss_bytes": _rss()}
        if self.device is not None and self.device.type == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(self.device)
            memory.update(gpu_allocated_bytes=torch.cuda.memory_allocated(self.device), gpu_free_bytes=free,
                          gpu_total_bytes=total)
        return {"service": "sslmedsam2", "version": __version__, "api": API_VERSION, "instance": self.instance,
                "device": str(self.device), "default_model": self.model,
                "default_image_size": self._image_size(self.model, None), "models_built": models,
                "sessions": len(sessions), "your_sessions": sum(s.owner == owner for s in sessions),
                "jobs_active": len(self.runner.active()), "memory": memory,
                "limits": {"max_sessions": self.settings.max_sessions,
                           "max_sessions_per_token": self.settings.per_token_sessions,
                           "max_uploads": self.settings.max_uploads,
                           "idle_timeout_s": self.settings.idle_timeout_s,
                           "max_request_bytes": self.settings.max_request_bytes,
                           "max_voxels": self.settings.max_voxels}}


def _trim_heap() -> None:
    """glibc keeps the memory an upload's decoding freed in its arenas (the RSS stays up); hand it back (Linux)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
