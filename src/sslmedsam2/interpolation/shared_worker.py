"""Client of the per-user ITK worker (worker_server), which outlives the command that started it.

Loading ITK's Python wrapping costs about 10 s; a worker that stays up between commands makes every later
`propagate --method interpolate` cost the filter alone. It listens on a Unix socket in a folder only this user
may enter ($XDG_RUNTIME_DIR/sslmedsam2, else <temp>/sslmedsam2-<uid>, or $SSLMEDSAM2_ITK_WORKER_DIR), and ends
by itself after $SSLMEDSAM2_ITK_WORKER_IDLE seconds (default 600) without a request. One connection per request:
a crash of the worker fails only the request it was serving, and the next request starts a new worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sslmedsam2.errors import UserError, WorkerError
from sslmedsam2.interpolation.itk_worker import array_bytes, bytes_array, read_answer, write_frame

PROTOCOL = 1
DIR_ENV, IDLE_ENV = "SSLMEDSAM2_ITK_WORKER_DIR", "SSLMEDSAM2_ITK_WORKER_IDLE"
DEFAULT_IDLE = 600.0
BIND_TIMEOUT = 60.0  # a started worker opens its socket before it loads ITK: seconds at most
READY_TIMEOUT = 180.0  # loading ITK: 9-25 s measured on 2 cores
_MAX_SOCKET_PATH = 100  # sun_path holds 104 (macOS) or 108 (Linux) bytes
_children: dict[int, subprocess.Popen] = {}  # workers this process started, so that it can reap them


class WorkerDirError(WorkerError):
    """The worker's folder is unsafe or unusable; the caller falls back to a worker of its own."""


def supported() -> bool:
    """Unix sockets with the owner checks this relies on (not Windows)."""
    return os.name == "posix" and hasattr(socket, "AF_UNIX")


def idle_timeout() -> float:
    """Seconds without a request after which a worker started now exits ($SSLMEDSAM2_ITK_WORKER_IDLE, default 600)."""
    text = os.environ.get(IDLE_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_IDLE
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{IDLE_ENV}={text!r}: expected the worker's idle timeout in seconds, a positive number")
    return value


def worker_directory() -> Path:
    """Where the socket lives: $SSLMEDSAM2_ITK_WORKER_DIR, $XDG_RUNTIME_DIR/sslmedsam2, else <temp>/sslmedsam2-<uid>."""
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    with contextlib.suppress(OSError):
        if os.path.isabs(runtime) and os.stat(runtime).st_uid == os.getuid():  # not another user's (sudo -E)
            return Path(runtime) / "sslmedsam2"
    return Path(tempfile.gettempdir()) / f"sslmedsam2-{os.getuid()}"


def private_directory(path: Path) -> Path:
    """Create the folder (0700) or check it: a real folder of this user that nobody else may enter."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WorkerDirError(f"cannot create the ITK worker's folder {path}: {exc.strerror or exc}") from None
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise WorkerDirError(f"refusing the ITK worker's folder {path}: not a folder (a link or a file)")
    if info.st_uid != os.getuid():
        raise WorkerDirError(f"refusing the ITK worker's folder {path}: it belongs to uid {info.st_uid}, "
                             f"not {os.getuid()}")
    if info.st_mode & 0o077:
        raise WorkerDirError(f"refusing the ITK worker's folder {path}: other users may enter it "
                             f"(mode {stat.S_IMODE(info.st_mode):o}, expected 700)")
    return path


def peer_credentials(sock: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the other end of a Unix socket, where the system says (Linux); None elsewhere."""
    if not hasattr(socket, "SO_PEERCRED"):
        return None
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _key() -> str:
    """One worker per interpreter, environment and worker code: an upgraded or other venv never gets a stale one."""
    here = Path(__file__).resolve().parent
    parts = [sys.executable, sys.prefix, str(here), str(PROTOCOL)]
    for name in ("itk_worker.py", "worker_server.py", "shared_worker.py"):
        parts.append(str((here / name).stat().st_mtime_ns))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class WorkerPaths:
    directory: Path
    socket: Path
    spawn_lock: Path
    bind_lock: Path
    log: Path

    @classmethod
    def in_directory(cls, directory: Path, key: str | None = None) -> "WorkerPaths":
        stem = directory / f"itk-{key or _key()}"
        paths = cls(directory, stem.with_suffix(".sock"), stem.with_suffix(".lock"), stem.with_suffix(".bind.lock"),
                    stem.with_suffix(".log"))
        if len(os.fsencode(paths.socket)) > _MAX_SOCKET_PATH:
            raise WorkerDirError(f"the ITK worker's socket path {paths.socket} is too long for a Unix socket")
        return paths


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    """A connection to the worker's socket, which must belong to this user (FileNotFoundError or
    ConnectionRefusedError where no worker listens). A full listen queue (many commands while the worker still
    loads ITK) is waited out, up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            break
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
        except BaseException:
            sock.close()
            raise
    try:
        peer = peer_credentials(sock)
        if peer is not None and peer[1] != os.getuid():
            raise WorkerDirError(f"refusing the ITK worker at {path}: it runs as uid {peer[1]}")
    except BaseException:
        sock.close()
        raise
    return sock


class Sender:
    """write_frame's stream on a socket: every byte sent or an error, nothing left buffered to fail again at close."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def flush(self) -> None:
        pass


def _gone(pid: int) -> bool:
    """Whether the process has ended (a zombie whose parent has not reaped it yet counts as ended)."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    return False


def _reap() -> None:
    """Collect the workers this process started that have ended (a long-lived process would keep zombies)."""
    for pid, child in list(_children.items()):
        if child.poll() is not None:
            del _children[pid]


def stop_worker(path: Path, timeout: float = 10.0) -> bool:
    """End the worker listening on `path` (SIGTERM, SIGKILL after `timeout`); False where none listened."""
    try:
        sock = connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    with sock, sock.makefile("rb") as reader:
        peer = peer_credentials(sock)
        if peer is not None:
            pid = peer[0]
        else:  # no SO_PEERCRED: the worker's greeting names it, once it has loaded ITK
            sock.settimeout(READY_TIMEOUT)
            pid = int(json.loads(read_answer(reader)[1])["pid"])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _gone(pid):
            break
    _reap()
    return True


def stop_all(directory: Path, timeout: float = 10.0) -> int:
    """End every worker with a socket in `directory` (tests: none may outlive the suite); how many ran."""
    return sum(stop_worker(path, timeout) for path in sorted(Path(directory).glob("itk-*.sock")))


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
    return "no message"


class SharedWorker:
    """The per-user worker seen from one process: connect, or start it (once, whoever asks first) and wait."""

    def __init__(self, directory: Path) -> None:
        self.paths = WorkerPaths.in_directory(private_directory(directory))
        self._lock = threading.Lock()
        self._starter: threading.Thread | None = None

    def start(self) -> None:
        """Make sure a worker is loading or ready, and return at once (a thread does it; a request reports errors)."""
        with self._lock:
            if self._starter is None or not self._starter.is_alive():
                self._starter = threading.Thread(target=self._start_quietly, name="itk-worker-start", daemon=True)
                self._starter.start()

    def _start_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._open().close()

    def interpolate(self, seeds_map: np.ndarray) -> np.ndarray:
        """One request on a connection of its own; WorkerError (one line) when the worker fails or dies."""
        sock, reader, pid = self._connect()
        with sock, reader:
            try:
                write_frame(Sender(sock), array_bytes(seeds_map))
                status, payload = read_answer(reader)
            except (EOFError, OSError) as exc:
                raise WorkerError(f"contour interpolation failed: {self._stopped(pid, exc)}") from None
        if status != 0:
            raise WorkerError(f"contour interpolation failed: {payload.decode(errors='replace')}")
        return bytes_array(payload)

    def pid(self) -> int | None:
        """The running worker's process id (waiting until it is ready); None where none runs. Starts nothing."""
        try:
            sock = connect(self.paths.socket)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        with sock, sock.makefile("rb") as reader:
            return self._hello(sock, reader)

    def stop(self, timeout: float = 10.0) -> bool:
        """End the running worker (SIGTERM, then SIGKILL after `timeout`); False where none ran."""
        return stop_worker(self.paths.socket, timeout)

    def _connect(self) -> tuple[socket.socket, BinaryIO, int]:
        if self._starter is not None:
            self._starter.join()
        sock = self._open()
        reader = sock.makefile("rb")
        try:
            return sock, reader, self._hello(sock, reader)
        except BaseException:
            reader.close()
            sock.close()
            raise

    def _open(self) -> socket.socket:
        private_directory(self.paths.directory)  # checked again: it may have changed since this process looked
        _reap()
        try:
            return connect(self.paths.socket)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(self.paths.spawn_lock), timeout=BIND_TIMEOUT + 30):
                try:
                    return connect(self.paths.socket)  # another command started it while this one waited
                except (FileNotFoundError, ConnectionRefusedError):
                    return self._spawn_and_open()
        except Timeout:
            raise WorkerError(f"another command is starting the ITK worker and has not finished "
                               f"(lock {self.paths.spawn_lock})") from None

    def _spawn_and_open(self) -> socket.socket:
        process = self._spawn()
        deadline = time.monotonic() + BIND_TIMEOUT
        while True:
            try:
                return connect(self.paths.socket)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            code = process.poll()
            if code not in (None, 0):  # 0: a worker started by someone else opened the socket first
                raise WorkerError(f"the ITK worker could not start (exit {code}): {_last_line(self.paths.log)} "
                                   f"(log: {self.paths.log})")
            if time.monotonic() > deadline:
                raise WorkerError(f"the ITK worker did not open {self.paths.socket} within {BIND_TIMEOUT:.0f} s "
                                   f"(log: {self.paths.log})")
            time.sleep(0.02)

    def _spawn(self) -> subprocess.Popen:
        """Detached (a session of its own, no terminal, stdin/stdout on devnull) so that it outlives this command."""
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the sslmedsam2 package
        code = ("import sys; r = sys.argv[1]; r in sys.path or sys.path.insert(0, r); "
                "from sslmedsam2.interpolation.worker_server import main; main(sys.argv[2:])")
        log = os.open(self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", code, root, "--socket", str(self.paths.socket), "--idle", str(idle_timeout())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, cwd=str(self.paths.directory),
                start_new_session=True, close_fds=True)
        finally:
            os.close(log)
        _children[process.pid] = process
        return process

    def _hello(self, sock: socket.socket, reader: BinaryIO) -> int:
        """The worker's first frame, sent once ITK is loaded: its protocol and process id."""
        sock.settimeout(READY_TIMEOUT)
        try:
            status, payload = read_answer(reader)
        except TimeoutError:
            raise WorkerError(f"the ITK worker did not become ready within {READY_TIMEOUT:.0f} s "
                               f"(log: {self.paths.log})") from None
        except (EOFError, OSError):
            raise WorkerError(f"the ITK worker stopped before it was ready: {_last_line(self.paths.log)} "
                               f"(log: {self.paths.log})") from None
        try:
            hello = json.loads(payload) if status == 0 else {}
        except ValueError:
            hello = {}
        if not isinstance(hello, dict) or hello.get("protocol") != PROTOCOL or not isinstance(hello.get("pid"), int):
            raise WorkerError(f"the ITK worker at {self.paths.socket} speaks another protocol: {payload[:80]!r}")
        sock.settimeout(None)
        return int(hello["pid"])

    def _stopped(self, pid: int, exc: BaseException) -> str:
        """Why the connection broke, in one line: the exit status where this process started the worker."""
        how, deadline = f"the connection broke: {type(exc).__name__}", time.monotonic() + 2
        while time.monotonic() < deadline and not _gone(pid):
            time.sleep(0.02)
        child = _children.get(pid)
        if child is not None and child.returncode is not None:
            code = child.returncode
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        elif _gone(pid):
            how = "it is gone"
        return f"the ITK worker (pid {pid}) stopped during the request ({how}; log: {self.paths.log})"
