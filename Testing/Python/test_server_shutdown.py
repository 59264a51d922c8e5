"""How `serve` stops: gracefully on the first request (whichever thread the OS gave the signal to, or when standard
input closes), at once on the second or when the graceful stop is overdue; the sessions' data goes either way."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import TINY_SIZE, free_port, wait_for_server

from sslmedsam2.remote.client import Client
from sslmedsam2.server.shutdown import Shutdown, stop_when_closed


class Recorder:
    def __init__(self, tmp_path) -> None:
        self.folder = tmp_path / "sessions"
        self.folder.mkdir()
        (self.folder / "image.nii.gz").write_bytes(b"patient")
        self.stops, self.exits, self.lines = 0, [], []

    def shutdown(self, grace_s: float = 30.0) -> Shutdown:
        return Shutdown(self.stop, lambda: self.folder, self.lines.append, grace_s=grace_s, exit=self.exits.append)

    def stop(self) -> None:
        self.stops += 1


def test_first_request_stops_gracefully_and_a_second_at_once(tmp_path):
    seen = Recorder(tmp_path)
    shutdown = seen.shutdown()
    shutdown.request("SIGTERM")
    assert seen.stops == 1 and seen.exits == [] and seen.folder.exists()
    assert seen.lines == ["SIGTERM: stopping (send it again to stop at once)"]
    shutdown.request("SIGINT")
    assert seen.stops == 1 and seen.exits == [1] and not seen.folder.exists()
    assert seen.lines[-1] == "SIGINT again: stopped at once; every session's data is deleted"


def test_a_graceful_stop_that_finishes_in_time_is_not_forced(tmp_path):
    seen = Recorder(tmp_path)
    shutdown = seen.shutdown(grace_s=0.3)
    shutdown.request("SIGTERM")
    shutdown.done()
    time.sleep(0.6)
    assert seen.exits == [] and seen.folder.exists()
    shutdown.request("SIGTERM")  # after the end: nothing more to do
    assert seen.exits == []


def test_an_overdue_graceful_stop_is_forced(tmp_path, capfd):
    seen = Recorder(tmp_path)
    shutdown = seen.shutdown(grace_s=0.3)
    shutdown.request("SIGTERM")
    deadline = time.monotonic() + 10
    while not seen.exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen.exits == [1] and not seen.folder.exists()
    assert "did not finish within 0 s" in seen.lines[1]
    assert "test_an_overdue_graceful_stop_is_forced" in capfd.readouterr().err  # every thread's stack, this one too


def test_end_of_standard_input_requests_the_stop(tmp_path):
    seen = Recorder(tmp_path)
    shutdown = seen.shutdown()
    read, write = os.pipe()
    with open(read, "rb") as stream:
        watcher = stop_when_closed(stream, shutdown)
        os.write(write, b"anything the parent writes is ignored\n")
        time.sleep(0.2)
        assert seen.stops == 0
        os.close(write)
        watcher.join(10)
    assert seen.stops == 1 and "standard input closed" in seen.lines[0]
    stop_when_closed(io.BytesIO(b""), shutdown).join(10)  # asked a second time: at once
    assert seen.exits == [1] and not seen.folder.exists()


def _serve(tmp_path, tiny_checkpoint, script: str, *extra: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    work = tmp_path / "tmp"
    work.mkdir()
    arguments = ["serve", "--port", str(port), "--device", "cpu", "--model", "sam2.1-tiny", "--checkpoint",
                 str(tiny_checkpoint), "--image-size", str(TINY_SIZE), *extra]
    process = subprocess.Popen([sys.executable, "-c", script, *arguments], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "TMPDIR": str(work)})
    return process, port


def _wait_ready(process: subprocess.Popen, port: int) -> None:
    client = Client(f"http://127.0.0.1:{port}")
    try:
        wait_for_server(process, client)
    finally:
        client.close()


def _stopped_cleanly(process: subprocess.Popen, tmp_path, within: float) -> str:
    try:
        code = process.wait(within)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"serve did not stop within {within} s: {process.communicate()[0]}")
    output = process.stdout.read()
    assert code == 0, output
    assert "stopped; every session's data is deleted" in output
    assert not list((tmp_path / "tmp").glob(".sslmedsam2-server.*")), "the server's folder is gone"
    return output


def test_sigterm_given_to_another_thread_still_stops_serve(tiny_checkpoint, tmp_path):
    """The OS may hand a process's signal to any of its threads (a CUDA driver thread, say); the main thread, idle
    between jobs, must still notice it."""
    script = textwrap.dedent("""
        import signal, sys, threading
        def other_thread():
            sys.stdin.readline()  # the test says when
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        threading.Thread(target=other_thread, daemon=True).start()
        from sslmedsam2.cli import main
        sys.exit(main(sys.argv[1:]))
        """)
    process, port = _serve(tmp_path, tiny_checkpoint, script)
    try:
        _wait_ready(process, port)
        process.stdin.write("now\n")
        process.stdin.flush()
        assert "SIGTERM: stopping" in _stopped_cleanly(process, tmp_path, within=20)
    finally:
        if process.poll() is None:
            process.kill()


def test_exit_with_stdin_stops_serve_when_its_parent_goes(tiny_checkpoint, tmp_path):
    script = "import sys; from sslmedsam2.cli import main; sys.exit(main(sys.argv[1:]))"
    process, port = _serve(tmp_path, tiny_checkpoint, script, "--exit-with-stdin")
    try:
        _wait_ready(process, port)
        time.sleep(0.5)
        assert process.poll() is None, "an open standard input keeps it serving"
        process.stdin.close()
        assert "standard input closed" in _stopped_cleanly(process, tmp_path, within=30)
    finally:
        if process.poll() is None:
            process.kill()


def test_an_http_server_that_cannot_start_is_one_line_and_exit_1(tiny_checkpoint, tmp_path, monkeypatch, capfd):
    import uvicorn

    from sslmedsam2.cli import main

    def broken(self, sockets=None):
        raise RuntimeError("no event loop here")

    monkeypatch.setattr(uvicorn.Server, "run", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert main(["serve", "--port", "0", "--device", "cpu", "--model", "sam2.1-tiny", "--checkpoint",
                 str(tiny_checkpoint), "--image-size", str(TINY_SIZE)]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == "sslmedsam2: error: cannot serve on 127.0.0.1:0: RuntimeError: no event loop here", err
    assert not any("serving" in line for line in err)
    assert not list(tmp_path.glob(".sslmedsam2-server.*")), "its private folder is deleted"
