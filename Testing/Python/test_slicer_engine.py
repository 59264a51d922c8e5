"""The module's engine session without Slicer: a real `sslmedsam2 serve` (random-weight SAM2 on 127.0.0.1) started
as the module starts it, the client calls on one persistent worker thread delivered by pump(), a server that dies
or restarts (reopened and retried once, and said so), a server that stops when Slicer dies, remote servers with a
token, and the one-line errors the panel shows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SIZE, seeds_on, synthetic_case, to_image

MODULE_DIR = Path(__file__).resolve().parents[2] / "SSLMedSAM2"
sys.path.insert(0, str(MODULE_DIR))

from SSLMedSAM2Lib.interactive import (EngineWorker, InteractiveEngine, PropagationRequest, Reporter,  # noqa: E402
                                       VolumeSource, _health, prompt_planes, user_message)
from SSLMedSAM2Lib.parameters import Connection, EngineSettings  # noqa: E402
from SSLMedSAM2Lib.server_process import LocalServer, LogRelay, ServerStartError, free_port  # noqa: E402

from sslmedsam2.remote.client import Client, ServerError, ServerUnreachable  # noqa: E402
from sslmedsam2.server.limits import ServerSettings  # noqa: E402
from sslmedsam2.server.main import serve_in_thread  # noqa: E402

LOCAL = Connection()
SEEDS = {1: [6, 11], 2: [9, 13]}  # label: the slices it is drawn on
PROMPTS = (6, 9, 11, 13)


def _settings(checkpoint) -> EngineSettings:
    return EngineSettings(model="sam2.1-tiny", checkpoint=str(checkpoint), image_size=TINY_SIZE, device="cpu")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The image file's bytes as the module exports them, its (k, j, i) seeds and labels."""
    image, labels = synthetic_case(shape=(16, 48, 48))
    path = tmp_path_factory.mktemp("case") / "image.nrrd"
    sitk.WriteImage(to_image(image), str(path))
    return path.read_bytes(), seeds_on(labels, SEEDS), labels


class Collect:
    """A Reporter whose events are kept (the worker's reporter posts them to the GUI thread instead)."""

    def __init__(self) -> None:
        self.events: list = []
        self._reporter = Reporter(lambda kind, payload: self.events.append((kind, payload)))

    def reporter(self) -> Reporter:
        return self._reporter


def _request(case, checkpoint, connection=LOCAL, key=("volume", 1), data=True, prompts=PROMPTS):
    image, seeds, _ = case
    source = VolumeSource(key, "image.nrrd", "axial", "mri", image if data else None)
    return PropagationRequest(connection, _settings(checkpoint), source, seeds, list(prompts))


def _check_result(result, case) -> None:
    _, seeds, _ = case
    assert result.labels.shape == seeds.shape and result.array_axis == 0
    for label, slices in SEEDS.items():  # each label comes back exactly as drawn on its prompt slices
        for z in slices:
            np.testing.assert_array_equal(result.labels[z] == label, seeds[z] == label)
    assert {r.slice for r in result.confidence} == set(range(seeds.shape[0]))
    assert len(result.confidence) == 2 * seeds.shape[0]


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    server = LocalServer()
    yield server
    server.stop()


def test_worker_runs_every_task_on_one_thread_and_delivers_only_in_pump():
    worker = EngineWorker()
    seen, threads, done = [], [], []

    def work(reporter: Reporter):
        threads.append(threading.get_ident())
        reporter.message("working")
        reporter.reset(total=4)
        reporter.update(3)
        return len(threads)

    def fails(reporter: Reporter):
        threads.append(threading.get_ident())
        raise ValueError("seeds: no labelled voxel")

    def waits_for_cancel(reporter: Reporter):
        deadline = time.monotonic() + 10
        while not reporter.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        return reporter.should_stop()

    worker.submit(work, lambda result, error: done.append((result, error)), lambda d, t: seen.append((d, t)),
                  seen.append)
    worker.submit(fails, lambda result, error: done.append((result, error)))
    worker.submit(work, lambda result, error: done.append((result, error)))
    assert worker.busy
    deadline = time.monotonic() + 10
    while len(threads) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert done == [] and seen == []  # nothing reaches the caller's thread outside pump()
    while worker.pump():
        time.sleep(0.01)
    assert seen == ["working", (0, 4), (3, 4)]
    assert done[0] == (1, None) and done[2] == (3, None)
    assert done[1][0] is None and isinstance(done[1][1], ValueError)
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()  # one persistent worker thread
    worker.submit(waits_for_cancel, lambda result, error: done.append((result, error)))
    time.sleep(0.1)
    worker.cancel()
    while worker.pump():
        time.sleep(0.01)
    assert done[-1] == (True, None)
    worker.close()
    assert not worker.thread.is_alive()


def test_the_local_engine_has_no_window_and_is_not_detached(monkeypatch):
    """Unlike the refine job, the server must end with Slicer: no session or process group of its own; on Windows
    no console window either."""
    from SSLMedSAM2Lib.launch import child_options

    class StartupInfo:  # subprocess.STARTUPINFO exists on Windows only
        def __init__(self) -> None:
            self.dwFlags, self.wShowWindow = 0, 1

    assert child_options(windows=False) == {}
    if not hasattr(subprocess, "STARTUPINFO"):
        monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    options = child_options(windows=True)
    assert options["creationflags"] == 0x08000000  # CREATE_NO_WINDOW, and no CREATE_NEW_PROCESS_GROUP
    assert options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0


def test_prompt_planes_along_the_sessions_axis():
    seeds = np.zeros((4, 5, 6), np.uint8)
    seeds[1, 2, 3] = 1
    seeds[3, 0, 5] = 2
    assert sorted(prompt_planes(seeds, 0, [1, 2, 3])) == [1, 3]  # slice 2 carries nothing: left out
    planes = prompt_planes(seeds, 2, [3, 5])
    assert sorted(planes) == [3, 5] and planes[3].shape == (4, 5) and planes[5][3, 0] == 2
    with pytest.raises(ValueError, match="none of the prompt slices"):
        prompt_planes(seeds, 0, [0, 2])


def test_local_engine_private_token_reuse_and_a_killed_server(local, case, tiny_checkpoint):
    engine = InteractiveEngine(local)
    collect = Collect()
    result = engine.propagate(_request(case, tiny_checkpoint), collect.reporter())
    _check_result(result, case)
    assert result.where.startswith("the local engine (http://127.0.0.1:") and result.notes == []
    assert any(kind == "progress" for kind, _ in collect.events)
    assert local.starts == 1 and local.alive()
    if os.name == "posix":  # serve refuses a token file others can read; the folder is private too
        assert local.folder.stat().st_mode & 0o777 == 0o700 and local.token_file.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ServerError, match="missing or wrong token"):  # other users of this machine get nothing
        Client(local.url).info()
    _health(local.url, local.token_file)

    # the same volume again: not exported again (data=None), the same session, only the prompts are sent
    session = engine._volume
    again = engine.propagate(_request(case, tiny_checkpoint, data=False, prompts=(6, 9)), Collect().reporter())
    assert engine._volume is session and engine.holds(("volume", 1), LOCAL)
    assert engine._client.session(session.id)["prompt_slices"] == [6, 9]  # replaced, not added to
    np.testing.assert_array_equal(again.labels[6] == 1, case[1][6] == 1)
    assert not engine.holds(("volume", 2), LOCAL)

    # the server dies between two propagations: started again, the volume sent again, and the panel is told
    local.process.send_signal(signal.SIGKILL)
    local.process.wait(30)
    result = engine.propagate(_request(case, tiny_checkpoint, data=False), Collect().reporter())
    _check_result(result, case)
    assert local.starts == 2 and "the local engine had stopped" in result.notes[0]
    engine.close()


def test_a_changed_device_or_checkpoint_starts_a_new_server_a_changed_model_does_not(local, tiny_checkpoint):
    from SSLMedSAM2Lib.server_process import key_of, needs_restart

    base = _settings(tiny_checkpoint)
    other_model = EngineSettings(**{**base.__dict__, "model": "medsam2", "checkpoint": ""})
    assert not needs_restart(key_of(EngineSettings(model="medsam2")), key_of(EngineSettings(model="sam2.1-tiny")))
    assert needs_restart(key_of(base), key_of(other_model))  # the checkpoint goes
    assert needs_restart(key_of(base), key_of(EngineSettings(**{**base.__dict__, "device": "cuda"})))
    assert needs_restart(key_of(EngineSettings()), key_of(EngineSettings(allow_download=True)))
    assert not needs_restart(key_of(EngineSettings(allow_download=True)), key_of(EngineSettings()))


def test_the_server_stops_when_slicer_dies(tiny_checkpoint, tmp_path):
    """Slicer killed (no aboutToQuit, no atexit): the server sees its standard input close and stops itself."""
    script = tmp_path / "slicer.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(MODULE_DIR)!r})
        from SSLMedSAM2Lib.interactive import _health
        from SSLMedSAM2Lib.parameters import EngineSettings
        from SSLMedSAM2Lib.server_process import LocalServer
        server = LocalServer()
        server.ensure(EngineSettings(model="sam2.1-tiny", checkpoint={str(tiny_checkpoint)!r}, image_size={TINY_SIZE},
                                     device="cpu"), lambda text: None, lambda: False, _health)
        print(server.process.pid, server.folder, flush=True)
        time.sleep(600)
        """))
    slicer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid, folder = slicer.stdout.readline().split()
        slicer.send_signal(signal.SIGKILL)
        slicer.wait(30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _alive(int(pid)):
            time.sleep(0.2)
        assert not _alive(int(pid)), "the engine server outlived Slicer"
        assert not Path(folder).exists(), "its token stayed behind"
    finally:
        if slicer.poll() is None:
            slicer.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped by init) is gone as far as this test cares
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def test_stop_is_graceful_and_deletes_the_token(tiny_checkpoint):
    server = LocalServer()
    server.ensure(_settings(tiny_checkpoint), lambda text: None, lambda: False, _health)
    process, folder = server.process, server.folder
    server.stop()
    assert process.returncode == 0  # it stopped itself (uvicorn's graceful stop), not a kill
    assert not folder.exists() and not server.alive() and server.url == ""


def test_a_port_taken_meanwhile_is_tried_once_more_and_cancel_stops_a_start(tiny_checkpoint, monkeypatch):
    import socket

    from SSLMedSAM2Lib import server_process

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1], free_port()])
    monkeypatch.setattr(server_process, "free_port", lambda: next(ports))
    server = LocalServer()
    try:
        url = server.ensure(_settings(tiny_checkpoint), lambda text: None, lambda: False, _health)
        assert server.starts == 2 and url == server.url and not url.endswith(f":{taken.getsockname()[1]}")
    finally:
        server.stop()
        taken.close()
    monkeypatch.undo()
    with pytest.raises(server_process.StartCancelled) as caught:
        server.ensure(_settings(tiny_checkpoint), lambda text: None, lambda: True, _health)
    assert user_message(caught.value, LOCAL) == "cancelled" and not server.alive() and server.folder is None


def test_a_start_that_fails_before_the_process_leaves_no_token(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def no_interpreter(arguments):
        raise OSError("python-real: no such file")

    server = LocalServer(launch=no_interpreter)
    with pytest.raises(OSError, match="python-real"):
        server.ensure(EngineSettings(), lambda text: None, lambda: False, _health)
    assert list(tmp_path.iterdir()) == [] and server.folder is None and not server.alive()


def test_a_server_that_cannot_start_says_why(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    server = LocalServer()
    with pytest.raises(ServerStartError) as caught:
        server.ensure(_settings(broken), lambda text: None, lambda: False, _health)
    assert "broken.pt" in str(caught.value)
    assert user_message(caught.value, LOCAL).startswith("the local engine did not start: ")
    assert not server.alive() and server.folder is None


def test_remote_engine_with_a_token_restarted_and_unreachable(case, tiny_checkpoint, tmp_path):
    token = tmp_path / "token"
    token.write_text("a-mistyped-token-of-some-length\n")
    token.chmod(0o600)
    port = free_port()
    remote = Connection("remote", f"http://127.0.0.1:{port}", str(token))
    settings = ServerSettings(port=port, device="cpu", model="sam2.1-tiny", checkpoint=tiny_checkpoint,
                              image_size=TINY_SIZE, workdir=tmp_path, tokens=["a-remote-token-of-enough-length"])
    engine = InteractiveEngine(LocalServer())
    with serve_in_thread(settings):
        request = _request(case, tiny_checkpoint, remote)
        with pytest.raises(ServerError) as refused:
            engine.propagate(request, Collect().reporter())
        assert refused.value.status == 401
        token.write_text("a-remote-token-of-enough-length\n")  # corrected in the same file: read again
        result = engine.propagate(request, Collect().reporter())
        _check_result(result, case)
        assert result.where == f"the engine at http://127.0.0.1:{port}"
        assert result.notes == ["the local checkpoint file is not used by a remote engine (it uses its own weights)"]
    with pytest.raises(ServerUnreachable) as caught:  # stopped: said plainly, nothing retried
        engine.propagate(_request(case, tiny_checkpoint, remote, data=False), Collect().reporter())
    assert "cannot reach the SSLMedSAM2 server at http://127.0.0.1" in user_message(caught.value, remote)
    with serve_in_thread(settings):  # started again: the session is gone, reopened once and propagated
        result = engine.propagate(_request(case, tiny_checkpoint, remote, data=False), Collect().reporter())
        _check_result(result, case)
        assert f"the SSLMedSAM2 server at http://127.0.0.1:{port} restarted: the session is gone: the volume was sent " \
            "again and the propagation repeated" in result.notes
        engine._client.close_session(engine._volume.id)  # as its idle expiry does
        result = engine.propagate(_request(case, tiny_checkpoint, remote, data=False), Collect().reporter())
        _check_result(result, case)
        assert any(note.startswith("no open session") and "expired" in note for note in result.notes)
    engine.close()
    assert not engine.holds(("volume", 1), remote)


def test_closing_the_worker_runs_the_last_task_after_a_cancelled_one():
    """At exit: the run is cancelled, then the session's close is queued; close() must not cancel that too."""
    worker, ran = EngineWorker(), []

    def long_run(reporter: Reporter):
        while not reporter.should_stop():
            time.sleep(0.01)
        ran.append("run stopped")

    worker.submit(long_run, lambda result, error: None)
    time.sleep(0.05)
    worker.cancel()
    worker.submit(lambda reporter: ran.append("session closed"), lambda result, error: None)
    worker.close(timeout=10)
    assert ran == ["run stopped", "session closed"] and not worker.thread.is_alive()


def test_a_starting_servers_lines_and_download_bar_reach_the_panel(tmp_path):
    log, said, bars = tmp_path / "serve.log", [], []
    relay = LogRelay(log, said.append, lambda done, total: bars.append((done, total)))
    relay.poll()  # not written yet: nothing, no error
    text = ("sslmedsam2: downloading sam2.1-tiny weights (156 MB) to /cache/é.pt\n"
            "  2%|#  | 3.15M/156M [00:01<00:50]\r 50%|#####  | 78.0M/156M [00:20<00:20]\r").encode()
    cut = text.index("é".encode()) + 1  # a character split between two reads
    log.write_bytes(text[:cut])
    relay.poll()
    with open(log, "ab") as handle:
        handle.write(text[cut:] + b"sslmedsam2: model sam2.1-tiny at image size 1024 ready on cpu\n")
    relay.poll()
    assert said == ["downloading sam2.1-tiny weights (156 MB) to /cache/é.pt",
                    "model sam2.1-tiny at image size 1024 ready on cpu"]
    assert bars[-1] == (78_000_000, 156_000_000)
