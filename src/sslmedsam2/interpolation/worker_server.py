"""The per-user ITK worker: loads ITK once and serves every process of this user on a private Unix socket.

Started detached by shared_worker (`python -c ... --socket PATH --idle SECONDS`); never imports SimpleITK (see
itk_worker). It opens its socket first (0600, in a 0700 folder; only this user's connections are served where the
system names the peer), loads ITK, then greets each connection with {"protocol", "pid"} and answers its requests
(itk_worker's frames), one filter call at a time. After SECONDS without a request or open connection it removes
its socket, answers the connections already queued, and exits; SIGTERM ends it at once, removing the socket too.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

from sslmedsam2.interpolation.itk_worker import answer, read_frame, warm_up, write_frame
from sslmedsam2.interpolation.shared_worker import (PROTOCOL, Sender, WorkerPaths, connect, peer_credentials,
                                                  private_directory)

CONNECTION_TIMEOUT = 300.0  # a client that stops sending mid-request is dropped, so that idle time can run out


def log(message: str) -> None:
    """One line in the worker's log (its stderr); a full disk must not end the worker."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {message}", file=sys.stderr, flush=True)


class WorkerServer:
    """Accepts connections on the socket, serves each in a thread, ends when idle."""

    def __init__(self, path: Path, idle: float) -> None:
        self.path, self.idle = path, idle
        self.paths = WorkerPaths.in_directory(path.parent, key=path.stem.removeprefix("itk-"))
        self.listener: socket.socket | None = None
        self.inode = -1
        self._filter = threading.Lock()  # ITK filter calls one at a time
        self._state = threading.Condition()
        self._open = 0
        self._last = time.monotonic()

    def bind(self) -> bool:
        """Open the socket unless a worker already listens there (False: this one is not needed)."""
        from filelock import FileLock

        private_directory(self.path.parent)
        with FileLock(str(self.paths.bind_lock), timeout=30):
            try:
                connect(self.path).close()
                return False
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)  # a dead worker's
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # the socket is born 0600
            try:
                listener.bind(str(self.path))
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            listener.listen(64)
        self.listener, self.inode = listener, os.stat(self.path).st_ino
        return True

    def serve(self) -> None:
        """Load ITK, then serve until idle; the socket is removed however this ends."""
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(sys.stderr.fileno(), 0)  # this worker's log only: the file is shared by its successors
            log(f"loading ITK; socket {self.path}, idle timeout {self.idle:g} s")
            warm_up()
            log("ready")
            self._touch()
            self.listener.settimeout(min(1.0, max(0.05, self.idle / 10)))
            while not self._idle():
                try:
                    conn, _ = self.listener.accept()
                except TimeoutError:
                    continue
                self._begin()
                threading.Thread(target=self._connection, args=(conn,), daemon=True).start()
            log(f"no request for {self.idle:g} s: stopping")
            self._remove_socket()
            self.listener.setblocking(False)
            while True:  # connections queued before the socket was removed are still answered
                try:
                    conn, _ = self.listener.accept()
                except (BlockingIOError, TimeoutError):
                    break
                self._begin()
                self._connection(conn)
            with self._state:
                self._state.wait_for(lambda: self._open == 0, timeout=CONNECTION_TIMEOUT)
        finally:
            self._remove_socket()
            self.listener.close()

    def _idle(self) -> bool:
        with self._state:
            return self._open == 0 and time.monotonic() - self._last >= self.idle

    def _touch(self) -> None:
        with self._state:
            self._last = time.monotonic()

    def _begin(self) -> None:
        with self._state:
            self._open += 1
            self._last = time.monotonic()

    def _end(self) -> None:
        with self._state:
            self._open -= 1
            self._last = time.monotonic()
            self._state.notify_all()

    def _connection(self, conn: socket.socket) -> None:
        """The hello, then answers until the client closes; errors of one connection end only that one."""
        try:
            with conn:
                peer = peer_credentials(conn)
                if peer is not None and peer[1] != os.getuid():
                    log(f"refused a connection from uid {peer[1]} (pid {peer[0]})")
                    return
                conn.settimeout(CONNECTION_TIMEOUT)
                writer = Sender(conn)
                with conn.makefile("rb") as reader:
                    hello = json.dumps({"protocol": PROTOCOL, "pid": os.getpid()}).encode()
                    write_frame(writer, hello, status=0)
                    while True:
                        try:
                            payload = read_frame(reader)
                        except EOFError:
                            return
                        self._touch()
                        with self._filter:
                            data, status = answer(payload)
                        write_frame(writer, data, status=status)
                        self._touch()
        except (OSError, EOFError):
            pass  # the client went away
        except Exception as exc:  # noqa: BLE001 (the worker outlives one bad connection)
            log(f"connection failed: {type(exc).__name__}: {exc}")
        finally:
            self._end()

    def _remove_socket(self) -> None:
        """Only this worker's socket: a successor may already have bound the same path."""
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_ino == self.inode:
                os.unlink(self.path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sslmedsam2-itk-worker")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--idle", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the finally clauses remove the socket
    faulthandler.enable()  # a crash in ITK leaves its trace in the log
    server = WorkerServer(args.socket, args.idle)
    if not server.bind():
        return  # another worker got there first: the commands use it
    try:
        server.serve()
    finally:
        log("stopped")


if __name__ == "__main__":
    main()
