"""A session on a `sslmedsam2 serve` server, with the local session's API. The volume is sent once; a session lost
to a restarted (or expired) server is opened again and the propagation repeated once, with every prompt, and the
result says so. numpy and requests only (the thin client): no torch."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sslmedsam2.jobs import Progress
from sslmedsam2.labelmap.confidence import parse_confidence
from sslmedsam2.provenance import new_result_id, text_mark
from sslmedsam2.remote.client import Client, ServerError, SessionGone
from sslmedsam2.session.base import SessionResult
from sslmedsam2.session.prompts import merged
from sslmedsam2.settings import check_mode
from sslmedsam2.volume.slices import SliceGrid


# Files sent as they are (gzip-compressed on the way where they are not already); anything else (a DICOM folder, a
# header with a separate data file) is sent as a compressed .nrrd of the image as read here.
_SENT_AS_IS = (".nii.gz", ".nii", ".nrrd", ".mha")


def image_payload(path: Path, image=None) -> tuple[bytes, str]:
    """The image as the server receives it: the file's own bytes and name, or a .nrrd of `image` (the image as read
    here; read again when not given)."""
    import tempfile

    from sslmedsam2.atomic import full_suffix

    path = Path(path)
    if path.is_file() and full_suffix(path).lower() in _SENT_AS_IS:
        return path.read_bytes(), path.name
    import SimpleITK as sitk

    from sslmedsam2.volume.io import read_volume

    image = read_volume(path) if image is None else image
    with tempfile.TemporaryDirectory(prefix="sslmedsam2-upload-") as folder:
        target = Path(folder) / f"{path.name or 'image'}.nrrd"
        sitk.WriteImage(image, str(target), useCompression=True)
        return target.read_bytes(), target.name


class RemoteSession:
    """`options`: how the server opens the volume (axis, modality, window, value_range, model, image_size)."""

    def __init__(self, client: Client, data: bytes, name: str, **options) -> None:
        self.client, self._data, self.name, self.options = client, data, name, options
        self.prompts: dict[int, np.ndarray] = {}
        self.result: SessionResult | None = None
        self._history: list[dict[int, np.ndarray]] = []  # the prompts of each earlier result the server keeps
        self.info: dict = {}
        self.instance: str | None = None
        self._open()

    @classmethod
    def for_settings(cls, client: Client, data: bytes, name: str, settings) -> "RemoteSession":
        """Opened with an EngineSettings' axis, intensity, model and image size (None: the server's own)."""
        intensity = settings.intensity
        return cls(client, data, name, axis=settings.axis, modality=intensity.modality, window=intensity.window,
                   value_range=intensity.value_range, model=settings.model, image_size=settings.image_size)

    def _open(self) -> None:
        self.instance = self.client.compatible_health().get("instance")
        self.info = self.client.open_session(self._data, self.name, **self.options)
        self.grid = SliceGrid.from_description(self.info)

    @property
    def id(self) -> str:
        return self.info["session"]

    @property
    def shape(self) -> tuple[int, int, int]:
        return int(self.info["slices"]), int(self.info["height"]), int(self.info["width"])

    def _gone(self, exc: ServerError) -> SessionGone | None:
        """The session is gone (closed, expired, or the server restarted: then the message says so), or None."""
        restarted = exc.instance and self.instance and exc.instance != self.instance
        if restarted and (isinstance(exc, SessionGone) or exc.status == 404):
            return SessionGone(f"the SSLMedSAM2 server at {self.client.url} restarted: the session is gone",
                               exc.status, "session_gone", exc.instance)
        return exc if isinstance(exc, SessionGone) else None

    def propagate(self, update: dict[int, np.ndarray], replace: bool = True, progress: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None, mode: str = "local") -> SessionResult:
        """See EngineSession.propagate; a lost session is opened again once (the volume sent again)."""
        check_mode(mode)
        started = time.perf_counter()
        prompts = merged(self.prompts, update, replace)
        notes: list[str] = []
        send, again = update, replace
        for attempt in (1, 2):
            try:
                labels, number, text, done = self._run(send, again, mode, progress, should_stop)
                break
            except ServerError as exc:
                gone = self._gone(exc)
                if gone is None:
                    raise
                if attempt == 2:
                    raise gone from None
                notes.append(f"{gone}: the volume was sent again and the propagation repeated")
                self._open()
                send, again = prompts, True  # the new session knows no prompt yet
        rows = parse_confidence(text)
        retracked = done.get("retracked")
        result = SessionResult(labels, rows, number, text_mark(text).result or new_result_id(),
                               time.perf_counter() - started, tuple(notes), done.get("mode") or "exact",
                               None if retracked is None else tuple(retracked))
        if labels.shape != self.shape:
            raise ServerError(f"the server answered a label map of shape {labels.shape} for a volume of {self.shape}; "
                              "is its sslmedsam2 version compatible?")
        if self.result is not None and not notes:  # a reopened session has no earlier result to go back to
            self._history.append(self.prompts)
        elif notes:
            self._history.clear()
        self.prompts, self.result = prompts, result
        return result

    def _run(self, slices: dict[int, np.ndarray], replace: bool, mode: str, progress,
             should_stop) -> tuple[np.ndarray, int, str, dict]:
        job = self.client.propagate(self.id, slices, replace, mode)
        try:
            done = self.client.wait(job["job"], progress, should_stop=should_stop)
        except KeyboardInterrupt:
            self.client.cancel(job["job"])
            raise
        labels, number = self.client.labels(self.id)
        return labels, number, self.client.confidence(self.id), done

    def undo(self) -> SessionResult:
        """Back to the previous result on the server, exactly (prompts too); the server's one-line refusal when
        there is none (or the session was lost: a restarted server keeps no history)."""
        if not self._history:
            from sslmedsam2.errors import UserError

            raise UserError("nothing to undo: this session has no earlier result")
        answer = self.client.undo(self.id)
        labels, number = self.client.labels(self.id)
        text = self.client.confidence(self.id)
        self.prompts = self._history.pop()
        if not answer.get("can_undo"):  # the server keeps fewer steps than were made
            self._history.clear()
        self.result = SessionResult(labels, parse_confidence(text), number, text_mark(text).result or new_result_id())
        return self.result

    @property
    def can_undo(self) -> bool:
        return bool(self._history)

    def close(self) -> None:
        """Delete the session and its data on the server (a server already gone is fine)."""
        from sslmedsam2.remote.client import ServerUnreachable

        try:
            self.client.close_session(self.id)
        except (SessionGone, ServerUnreachable):
            pass

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
