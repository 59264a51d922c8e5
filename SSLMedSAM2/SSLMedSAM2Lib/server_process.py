"""The module's local engine: one `sslmedsam2 serve` per Slicer session, on a free loopback port, with a random
token in a file only this user can read. No Slicer here.

It is started as the engine commands are (launch.py: the real interpreter, Slicer's environment), or, given an
engine command (the `sslmedsam2` of another Python environment: a native one on a Mac, where Slicer's Python cannot
have the engine), as that program in the environment Slicer was started in; either way with a pipe on its standard
input that nothing writes to: when Slicer exits, or crashes, the pipe closes and the server stops
itself (`serve --exit-with-stdin`: the same graceful stop as SIGTERM, on every platform, so it deletes every
session's data). `stop()` does the same and waits.
"""

from __future__ import annotations

import codecs
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from SSLMedSAM2Lib.engine_output import EngineOutput
from SSLMedSAM2Lib.launch import child_options, engine_environment, engine_program, python_interpreter
from SSLMedSAM2Lib.parameters import EngineSettings, serve_command
from sslmedsam2.jobs import Cancelled

# Runs `sslmedsam2 serve ... --exit-with-stdin` (sys.argv[1:]): the server stops itself gracefully when standard
# input ends (Slicer gone), deleting every session's data; then this deletes the private folder (token, log). A
# server that failed keeps its log for the module to read (the module deletes the folder).
SERVE = """
import os, shutil, sys
from sslmedsam2.cli import main
code = main(sys.argv[1:])
if code == 0 and os.environ.get("SSLMEDSAM2_PRIVATE_FOLDER"):
    shutil.rmtree(os.environ["SSLMEDSAM2_PRIVATE_FOLDER"], ignore_errors=True)
sys.exit(code)
"""
LOG_TAIL_CHARS = 20000
START_TIMEOUT_S = 1800.0  # a first start may download the model's weights
STOP_GRACE_S = 8.0


class ServerStartError(RuntimeError):
    """The local engine did not start; the message is its own one-line error."""


class PortTaken(ServerStartError):
    """The free port found was taken before the server bound it (tried once more with another)."""


class StartCancelled(Cancelled):
    """Cancel was pressed while the local engine was starting (it is stopped): the engine's Cancelled."""


@dataclass(frozen=True)
class ServerKey:
    """What a running server was started with; other values of these need another server."""

    device: str
    checkpoint: str
    checkpoint_model: str  # the model the checkpoint holds ("" without a checkpoint)
    download: bool
    command: str = ""  # the engine command ("": Slicer's own Python)


def key_of(settings: EngineSettings, command: str = "") -> ServerKey:
    return ServerKey(settings.device, settings.checkpoint, settings.model if settings.checkpoint else "",
                     settings.allow_download, command)


def needs_restart(running: ServerKey, wanted: ServerKey) -> bool:
    """Models and image sizes are per session, so only the device, the checkpoint, the engine command and a newly
    allowed download ask for a new server (a server allowed to download serves one that is not)."""
    return (running.device, running.checkpoint, running.checkpoint_model, running.command) != \
        (wanted.device, wanted.checkpoint, wanted.checkpoint_model, wanted.command) or \
        (wanted.download and not running.download)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def private_folder() -> Path:
    """mkdtemp makes it 0700 on POSIX (in the user's own temporary folder on Windows)."""
    return Path(tempfile.mkdtemp(prefix="SSLMedSAM2-engine-"))


def write_token(folder: Path) -> Path:
    """A fresh random token, in a file created 0600 (serve refuses a token file other users can read)."""
    path = folder / "token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32) + "\n")
    return path


class LocalServer:
    """The server process, its private folder (token file, log) and its address. Thread-safe: the worker thread
    starts it, the main thread stops it at exit."""

    def __init__(self, launch: Callable[[list[str]], tuple[str, list[str]]] | None = None) -> None:
        self._launch = launch  # tests: (program, arguments) for serve's arguments
        self._lock = threading.RLock()
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.key: ServerKey | None = None
        self.url = ""
        self.starts = 0  # how many servers this object started (a restart after a crash shows as 2)

    @property
    def token_file(self) -> Path | None:
        return None if self.folder is None else self.folder / "token"

    @property
    def log_path(self) -> Path | None:
        return None if self.folder is None else self.folder / "serve.log"

    def alive(self) -> bool:
        """Lock-free (the GUI thread asks while the worker may be starting a server)."""
        process = self.process
        return process is not None and process.poll() is None

    def describe(self) -> str:
        process, url = self.process, self.url
        if process is not None and process.poll() is None:
            command = self.key.command if self.key is not None else ""
            return f"local engine at {url} (process {process.pid}" + (f", {command})" if command else ")")
        return "local engine: not running (it starts with the first propagation)"

    def ensure(self, settings: EngineSettings, say: Callable[[str], None], should_stop: Callable[[], bool],
               health: Callable[[str, Path], None], progress: Callable[[int, int], None] = lambda done, total: None,
               command: str = "") -> str:
        """The running server's URL, starting one (or a new one for other settings) and waiting until it answers.
        `health(url, token_file)` raises while it does not. While it starts, its own lines go to `say` and its
        bars (a weights download) to `progress`. command: the engine command ("": Slicer's own Python). Blocks:
        call it on the worker thread."""
        wanted = key_of(settings, command)
        with self._lock:
            if self.alive() and not needs_restart(self.key, wanted):
                return self.url
            if self.alive():
                say("the device, checkpoint, engine command or download setting changed: starting the local engine "
                    "again")
        try:
            return self._start_and_wait(settings, wanted, say, should_stop, health, progress)
        except PortTaken:  # another program took the free port meanwhile: once more, with another
            return self._start_and_wait(settings, wanted, say, should_stop, health, progress)

    def _start_and_wait(self, settings: EngineSettings, wanted: ServerKey, say: Callable[[str], None],
                        should_stop: Callable[[], bool], health: Callable[[str, Path], None],
                        progress: Callable[[int, int], None]) -> str:
        with self._lock:
            self.stop()
            self._start(settings, wanted)
            process, url, token, log = self.process, self.url, self.token_file, self.log_path
        say("starting the local engine (sslmedsam2 serve): building the model...")
        relay = LogRelay(log, say, progress)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            relay.poll()
            if process.poll() is not None:
                error = self.failure() or f"the local engine stopped with exit code {process.returncode}"
                self.stop()
                if error.startswith("cannot listen on"):
                    raise PortTaken(error)
                raise ServerStartError(error)
            try:
                health(url, token)
                return url
            except Exception:  # not listening yet
                pass
            if should_stop():
                self.stop()
                raise StartCancelled("cancelled while the local engine was starting")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"the local engine did not answer within {START_TIMEOUT_S / 60:.0f} min; "
                                       f"see its log {self.log_path}")
            time.sleep(0.25)

    def _start(self, settings: EngineSettings, key: ServerKey) -> None:
        folder = private_folder()
        try:
            token = write_token(folder)
            port = free_port()
            program, arguments, environment = self._program(serve_command(settings, port, str(token)), key.command)
            environment = {**environment, "SSLMEDSAM2_PRIVATE_FOLDER": str(folder)}
            with open(folder / "serve.log", "w", encoding="utf-8") as log:
                process = subprocess.Popen([program, *arguments], stdin=subprocess.PIPE, stdout=log,
                                           stderr=subprocess.STDOUT, env=environment, **child_options())
        except BaseException:  # no token left behind
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.process, self.folder, self.key, self.url = process, folder, key, f"http://127.0.0.1:{port}"
        self.starts += 1

    def _program(self, arguments: list[str], command: str) -> tuple[str, list[str], dict[str, str]]:
        """Program, arguments and environment of `sslmedsam2 serve ARGUMENTS`: the engine command as it is, in the
        environment Slicer was started in; else Slicer's real interpreter running SERVE, in Slicer's environment."""
        if self._launch is not None:
            program, program_arguments = self._launch(arguments)
            return program, program_arguments, engine_environment()
        if command:
            return engine_program(arguments, command)
        return python_interpreter(), ["-c", SERVE, *arguments], engine_environment()

    def failure(self) -> str | None:
        """The server's own one-line error from its log, if it wrote one."""
        path = self.log_path
        if path is None or not path.is_file():
            return None
        output = EngineOutput()
        output.feed(path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:] + "\n")
        return output.error

    def stop(self) -> None:
        """Close its standard input (it stops itself and deletes its sessions' data), then make sure it is gone,
        then delete the token and the log."""
        with self._lock:
            process, folder = self.process, self.folder
            self.process, self.folder, self.key, self.url = None, None, None, ""
        if process is not None:
            try:
                process.stdin.close()
            except OSError:
                pass
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(STOP_GRACE_S)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class LogRelay:
    """The new lines of a starting server's log, as they come: its messages to `say`, its bars to `progress`."""

    def __init__(self, path: Path, say: Callable[[str], None], progress: Callable[[int, int], None]) -> None:
        self.path, self.say, self.progress = path, say, progress
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._output = EngineOutput()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:  # not created yet, or already deleted
            return
        self._offset += len(chunk)
        update = self._output.feed(self._decoder.decode(chunk))
        for line in update.messages:
            self.say(line)
        if update.progress is not None:
            self.progress(*update.progress)


_SHARED: LocalServer | None = None
_SHARED_LOCK = threading.Lock()


def shared_server() -> LocalServer:
    """One local engine per Slicer session, whichever logic object asks (the panel's, the self-test's)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = LocalServer()
        return _SHARED


def stop_shared_server() -> None:
    """At Slicer's exit (aboutToQuit, and atexit as a fallback); harmless when none runs."""
    with _SHARED_LOCK:
        server = _SHARED
    if server is not None:
        server.stop()
