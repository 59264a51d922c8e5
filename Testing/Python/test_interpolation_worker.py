"""The shared ITK worker: one per user, reused by later commands, private, isolated from crashes, gone when idle.

Loading ITK costs about 10 s, so the tests share what they can: one worker serves the commands of the first test
and is killed by the second, whose replacement is the one that idles out.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import seeds_on, synthetic_case

from sslmedsam2.errors import UserError
from sslmedsam2.interpolation import shared_worker
from sslmedsam2.interpolation.contour import WORKER, interpolate_between_seeds
from sslmedsam2.labelmap.seeds import Seeds

pytestmark = pytest.mark.skipif(not shared_worker.supported(), reason="no Unix sockets: the child worker is used")


@pytest.fixture(scope="module")
def worker_dir(tmp_path_factory):
    """A worker folder of this module's own (its worker is stopped at the end), idle timeout 30 s."""
    directory = tmp_path_factory.mktemp("w")
    directory.chmod(0o700)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(shared_worker.DIR_ENV, str(directory))
        patch.setenv(shared_worker.IDLE_ENV, "30")
        patch.delenv("SSLMEDSAM2_ITK_WORKER", raising=False)
        yield directory
        shared_worker.stop_all(directory)


@pytest.fixture
def env(worker_dir, monkeypatch):
    """Per-test changes on top of the module's folder (monkeypatch undoes them)."""
    return monkeypatch


def _propagate(image, seeds, out) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sslmedsam2", "propagate", str(image), str(seeds), "-o", str(out),
                             "--method", "interpolate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def _seeds() -> Seeds:
    _, labels = synthetic_case(shape=(10, 24, 24))
    return Seeds(seeds_on(labels, {1: [3, 7]}))


def test_later_commands_reuse_the_worker_and_concurrent_ones_start_one(worker_dir, case_files, tmp_path):
    image, seeds, _ = case_files
    shared = shared_worker.SharedWorker(worker_dir)
    assert shared.pid() is None
    first = [_propagate(image, seeds, tmp_path / f"first{i}.nii.gz") for i in range(2)]  # both cold, at once
    for process in first:
        _finish(process)
    pid = shared.pid()
    assert pid is not None
    log = shared.paths.log.read_text()
    assert log.count("loading ITK") == 1 and f"[{pid}]" in log, log  # one worker served both
    started = time.perf_counter()
    _finish(_propagate(image, seeds, tmp_path / "later.nii.gz"))
    later = time.perf_counter() - started
    assert shared.pid() == pid  # the later command found it warm
    assert later < 8, f"{later:.1f} s with a warm worker (measured 0.4 s; loading ITK is 10 s)"
    outputs = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))
               for name in ("first0.nii.gz", "first1.nii.gz", "later.nii.gz")]
    assert all(np.array_equal(outputs[0], other) for other in outputs[1:]) and outputs[0].any()
    assert stat.S_IMODE(os.stat(worker_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(shared.paths.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(shared.paths.log).st_mode) == 0o600


def test_a_worker_killed_mid_request_fails_that_request_and_the_next_starts_a_new_one(env, worker_dir):
    seeds = _seeds()
    expected = interpolate_between_seeds(seeds).labels  # the first test's worker, or a new one
    shared = WORKER.backend()
    assert isinstance(shared, shared_worker.SharedWorker)
    pid = shared.pid()
    real_write = shared_worker.write_frame

    def killed_first(stream, payload, status=None):
        os.kill(pid, signal.SIGKILL)
        while not shared_worker._gone(pid):
            time.sleep(0.01)
        return real_write(stream, payload, status)

    env.setattr(shared_worker, "write_frame", killed_first)
    with pytest.raises(RuntimeError, match=f"ITK worker \\(pid {pid}\\) stopped during the request") as failed:
        interpolate_between_seeds(seeds)
    assert "\n" not in str(failed.value)
    env.setattr(shared_worker, "write_frame", real_write)
    env.setenv(shared_worker.IDLE_ENV, "2")  # the new worker: gone 2 s after its last request
    assert np.array_equal(interpolate_between_seeds(seeds).labels, expected)
    new = shared.pid()
    assert new not in (None, pid)
    deadline = time.monotonic() + 20
    while not shared_worker._gone(new) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shared_worker._gone(new), "the worker outlived its idle timeout"
    assert not shared.paths.socket.exists()  # it removed its socket
    assert "no request for 2 s: stopping" in shared.paths.log.read_text()


def test_the_worker_folder_must_be_private(tmp_path, env, capsys):
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(shared_worker.WorkerDirError, match="other users may enter it"):
        shared_worker.private_directory(open_folder)
    private = tmp_path / "private"
    assert stat.S_IMODE(shared_worker.private_directory(private).stat().st_mode) == 0o700  # created private
    (tmp_path / "link").symlink_to(private)
    with pytest.raises(shared_worker.WorkerDirError, match="not a folder"):
        shared_worker.private_directory(tmp_path / "link")
    if os.getuid() == 0:  # only root can give a folder away
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(shared_worker.WorkerDirError, match="belongs to uid 65534"):
            shared_worker.private_directory(theirs)
    with pytest.raises(shared_worker.WorkerDirError, match="too long"):
        shared_worker.WorkerPaths.in_directory(private / ("x" * 120))
    # refused: the command falls back to a worker of its own, and says why once
    env.setenv(shared_worker.DIR_ENV, str(open_folder))
    assert WORKER.backend() is WORKER.child and WORKER.backend() is WORKER.child
    assert capsys.readouterr().err.count("other users may enter it") == 1


def test_bad_settings_are_one_line_errors(env):
    env.setenv("SSLMEDSAM2_ITK_WORKER", "sometimes")
    with pytest.raises(UserError, match="SSLMEDSAM2_ITK_WORKER='sometimes'"):
        WORKER.backend()
    env.setenv("SSLMEDSAM2_ITK_WORKER", "child")
    assert WORKER.backend() is WORKER.child
    for bad in ("0", "soon", "-5"):
        env.setenv(shared_worker.IDLE_ENV, bad)
        with pytest.raises(UserError, match="idle timeout in seconds"):
            shared_worker.idle_timeout()


def test_a_full_listen_queue_is_waited_out(tmp_path):
    """Many commands at once while the worker still loads ITK fill its listen queue: a connection waits for room
    (it failed with 'Resource temporarily unavailable')."""
    import socket
    import threading

    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    for _ in range(8):  # fill the queue: the kernel refuses more without a wait
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(str(path))
            queued.append(client)
        except BlockingIOError:
            client.close()
            break
    else:
        pytest.skip("this kernel's queue did not fill")
    timer = threading.Timer(0.5, lambda: [listener.accept()[0].close() for _ in range(len(queued))])
    timer.start()
    try:
        shared_worker.connect(path, timeout=10).close()
    finally:
        timer.join()
        for client in queued:
            client.close()
        listener.close()
