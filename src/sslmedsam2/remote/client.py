"""Client of `sslmedsam2 serve`, for `propagate --server`, scripts and the 3D Slicer module.

requests, numpy and the standard library only: no torch, no FastAPI, no SimpleITK. Every failure is a UserError
with one line that says what happened and what to do:
  ServerUnreachable  nothing answers at the URL (server down, tunnel closed, wrong port)
  SessionGone        the session was closed, expired, or the server restarted (then the message says so): reopen
  ServerError        the server refused the request: its own one-line message (the command line's words)

The engine session on top of it (the local session's API, reopened after a server restart) is
sslmedsam2.session.remote.RemoteSession:

    client = Client("http://127.0.0.1:8765", token_file="~/.sslmedsam2-token")
    with RemoteSession(client, Path("ct.nii.gz").read_bytes(), "ct.nii.gz", modality="ct") as session:
        result = session.propagate({12: plane12, 30: plane30})      # (h, w) label planes by slice index
        result.labels, result.confidence                             # (n, h, w) along the axis; the table's rows
        result = session.propagate({20: corrected}, replace=False)  # an edit: only the tracking runs again
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import requests

from sslmedsam2.errors import UserError
from sslmedsam2 import __version__
from sslmedsam2.remote.wire import API_VERSION, INSTANCE_HEADER, read_array_message, slice_entry

_ALREADY_COMPRESSED = (".gz", ".zip", ".bz2", ".xz")


class ServerError(UserError):
    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 instance: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.instance = status, code, instance


class ServerUnreachable(ServerError):
    pass


class SessionGone(ServerError):
    pass


class JobFailed(ServerError):
    pass


class JobCancelled(ServerError):
    pass


class Client:
    def __init__(self, url: str, token: str | None = None, token_file: Path | str | None = None,
                 timeout: float = 120.0) -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 (checks the port: "http://host:x" fails here)
        except ValueError:  # e.g. "http://[::1" or a port out of range
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise UserError(f"--server {redact_url(url)!r}: give the server's address as http://HOST:PORT")
        if token is None and token_file is not None:
            from sslmedsam2.remote.tokens import read_client_token

            token = read_client_token(Path(token_file).expanduser())
        self._base = url.rstrip("/")  # what is requested
        self.url = redact_url(self._base)  # what messages show: no user-info (a password or token) of the URL
        self.timeout = timeout
        self._http = requests.Session()
        # A proxy from the environment must not see patient images or the token (nor intercept an SSH tunnel's
        # 127.0.0.1); a CA bundle named there (an https reverse proxy with an in-house certificate) is still used.
        self._http.trust_env = False
        self._http.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        if token:
            self._http.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self._http.close()

    # --- plumbing -------------------------------------------------------------------------------------------------
    def request(self, method: str, path: str, timeout: float | None = None, **kwargs) -> requests.Response:
        try:
            answer = self._http.request(method, self._base + path, timeout=timeout or self.timeout, **kwargs)
        except requests.exceptions.Timeout:
            raise ServerUnreachable(f"the SSLMedSAM2 server at {self.url} did not answer within "
                                    f"{timeout or self.timeout:.0f} s") from None
        except requests.exceptions.RequestException as exc:
            reason = _reason(exc)
            raise ServerUnreachable(f"cannot reach the SSLMedSAM2 server at {self.url} ({reason}); is `sslmedsam2 "
                                    "serve` running there, and the SSH tunnel open?") from None
        if answer.status_code >= 400:
            raise self._error(answer)
        return answer

    def _error(self, answer: requests.Response) -> ServerError:
        instance = answer.headers.get(INSTANCE_HEADER)
        try:
            body = answer.json()
            message, code = str(body["error"]), body.get("code")
        except (ValueError, KeyError, TypeError):
            return ServerError(f"{self.url} answered HTTP {answer.status_code} without an SSLMedSAM2 message; is it "
                               "an SSLMedSAM2 server?", answer.status_code, None, instance)
        if answer.status_code == 401:
            message = f"the SSLMedSAM2 server at {self.url} refused the request: {message}"
        kind = SessionGone if code == "session_gone" else ServerError
        return kind(message, answer.status_code, code, instance)

    def request_json(self, method: str, path: str, **kwargs) -> dict:
        """A request whose answer is JSON; anything else (another web server on that port) is a clear error."""
        answer = self.request(method, path, **kwargs)
        try:
            return answer.json()
        except ValueError:
            raise ServerError(f"{self.url} answered HTTP {answer.status_code} with something other than JSON; is it "
                              "an SSLMedSAM2 server?", answer.status_code, None,
                              answer.headers.get(INSTANCE_HEADER)) from None

    def get_json(self, path: str, **kwargs) -> dict:
        return self.request_json("GET", path, **kwargs)

    # --- the API --------------------------------------------------------------------------------------------------
    def health(self) -> dict:
        return self.get_json("/health", timeout=10)

    def compatible_health(self) -> dict:
        """/health, refused (ServerError, code api_mismatch) when the server speaks another API version."""
        health = self.health()
        api = health.get("api")
        if api != API_VERSION:
            raise ServerError(f"the SSLMedSAM2 server at {redact_url(self.url)} is version "
                              f"{health.get('version', '(unknown)')} with API {api if api is not None else '(none)'}, "
                              f"and this client ({__version__}) speaks API {API_VERSION}: install the same sslmedsam2 "
                              "version on both sides", code="api_mismatch", instance=health.get("instance"))
        return health

    def info(self) -> dict:
        return self.get_json("/info", timeout=30)

    def open_session(self, data: bytes, name: str, axis: str = "axial", modality: str = "mri",
                     window: str = "soft-tissue", value_range: tuple[float, float] | None = None,
                     model: str | None = None, image_size: int | None = None) -> dict:
        """Send an image file's bytes (gzip-compressed on the way unless the file already is)."""
        params = {"name": Path(name).name, "axis": axis, "modality": modality, "window": window}
        if value_range is not None:
            params["range_min"], params["range_max"] = value_range
        if model:
            params["model"] = model
        if image_size:
            params["image_size"] = image_size
        if not Path(name).name.lower().endswith(_ALREADY_COMPRESSED):
            data, params["encoding"] = gzip.compress(data, compresslevel=1), "gzip"
        return self.request_json("POST", "/sessions", params=params, data=data,
                                 headers={"Content-Type": "application/octet-stream"}, timeout=max(self.timeout, 600))

    def session(self, session_id: str) -> dict:
        return self.get_json(f"/sessions/{session_id}")

    def close_session(self, session_id: str) -> None:
        self.request("DELETE", f"/sessions/{session_id}", timeout=30)

    def propagate(self, session_id: str, slices: dict[int, np.ndarray], replace: bool = True,
                  mode: str = "local") -> dict:
        entries = [slice_entry(z, plane) for z, plane in sorted(slices.items())]
        return self.request_json("POST", f"/sessions/{session_id}/propagate",
                                 json={"slices": entries, "replace": replace, "mode": mode})

    def undo(self, session_id: str) -> dict:
        """Back to the session's previous result: {result, labels, can_undo}."""
        return self.request_json("POST", f"/sessions/{session_id}/undo", timeout=60)

    def job(self, job_id: str, wait: float = 0.0) -> dict:
        return self.get_json(f"/jobs/{job_id}", params={"wait": wait} if wait else None, timeout=wait + 60)

    def cancel(self, job_id: str) -> dict:
        return self.request_json("POST", f"/jobs/{job_id}/cancel", timeout=30)

    def wait(self, job_id: str, progress=None, poll: float = 0.5,
             should_stop: Callable[[], bool] | None = None) -> dict:
        """Follow a job to its end (progress: anything with reset(total) and update(n), e.g. tqdm). A job that
        failed raises JobFailed with the server's line; one that was cancelled raises JobCancelled."""
        shown, total, cancelled = 0, None, False
        while True:
            if should_stop is not None and not cancelled and should_stop():  # asked before or while it runs
                self.cancel(job_id)
                cancelled = True
            state = self.job(job_id, wait=poll)
            if progress is not None and state.get("total") is not None:
                if state["total"] != total:
                    total, shown = state["total"], 0
                    progress.reset(total=total)
                if state["done"] > shown:
                    progress.update(state["done"] - shown)
                    shown = state["done"]
            if state["state"] == "done":
                return state
            if state["state"] == "failed":
                raise JobFailed(state.get("error") or "the job failed", code="failed")
            if state["state"] == "cancelled":
                raise JobCancelled("propagation cancelled; the session's previous result is unchanged",
                                   code="cancelled")

    def labels(self, session_id: str) -> tuple[np.ndarray, int]:
        """The last result as a (n, h, w) array along the session's axis, and its result number."""
        message = self.get_json(f"/sessions/{session_id}/labels", params={"format": "raw"})
        return read_array_message(message, "label map from the server"), int(message["result"])

    def labels_file(self, session_id: str, fmt: str = "nifti") -> bytes:
        """The last result as a compressed file on the image grid (.nii.gz, or .nrrd)."""
        return self.request("GET", f"/sessions/{session_id}/labels", params={"format": fmt}).content

    def confidence(self, session_id: str) -> str:
        return self.request("GET", f"/sessions/{session_id}/confidence").text


def redact_url(url: str) -> str:
    """`url` with the user-info of its address (`user:password@`, `token@`) shown as `***@`, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min([i for i in (rest.find(c) for c in "/?#") if i >= 0] or [len(rest)])
    if "@" in rest[:end]:
        rest = "***@" + rest[:end].rpartition("@")[2] + rest[end:]
    return scheme + sep + rest


def _reason(exc: requests.exceptions.RequestException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "No route to host", "Connection reset",
                   "Remote end closed connection", "timed out", "certificate verify failed"):
        if marker.lower() in text.lower():
            return marker.lower()
    return type(exc).__name__
