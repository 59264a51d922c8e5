"""A real `sslmedsam2 serve` process, killed (SIGKILL) and started again: the client gets a clear line each time,
recovers by reopening the volume, and the killed server's data does not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SIZE, free_port, seeds_on, synthetic_case, to_image, wait_for_server

from sslmedsam2.remote.client import Client, ServerUnreachable
from sslmedsam2.session.remote import RemoteSession


def _start(port: int, checkpoint, workdir) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(workdir)}
    return subprocess.Popen([sys.executable, "-m", "sslmedsam2", "serve", "--port", str(port), "--device", "cpu",
                             "--model", "sam2.1-tiny", "--checkpoint", str(checkpoint), "--image-size", str(TINY_SIZE)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _folders(workdir, pid: int) -> list:
    return list(workdir.glob(f".sslmedsam2-server.*-{pid}-*"))


def test_killed_and_restarted_server(tiny_checkpoint, tmp_path):
    port = free_port()
    work = tmp_path / "tmp"
    work.mkdir()
    image, labels = synthetic_case(shape=(8, 24, 24))
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(to_image(image), str(path))
    seeds = seeds_on(labels, {1: [2, 5]})
    planes = {z: seeds[z] for z in (2, 5)}
    client = Client(f"http://127.0.0.1:{port}")
    with pytest.raises(ServerUnreachable, match="cannot reach the SSLMedSAM2 server at http://127.0.0.1"):
        client.info()

    first = _start(port, tiny_checkpoint, work)
    second = None
    try:
        wait_for_server(first, client)
        volume = RemoteSession(client, path.read_bytes(), path.name, model="sam2.1-tiny", image_size=TINY_SIZE)
        before = volume.propagate(planes)
        assert _folders(work, first.pid), "the server keeps its sessions in its own folder"
        first.send_signal(signal.SIGKILL)
        first.wait(30)

        with pytest.raises(ServerUnreachable, match="is `sslmedsam2 serve` running"):
            volume.propagate(planes)
        second = _start(port, tiny_checkpoint, work)
        wait_for_server(second, client)
        assert not _folders(work, first.pid), "a restarted server deletes what the killed one left"
        after = volume.propagate(planes)  # the session is opened again by itself, and says so
        assert after.notes and "restarted: the session is gone: the volume was sent again" in after.notes[0]
        np.testing.assert_array_equal(after.labels, before.labels)
        assert after.confidence == before.confidence

        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0
        assert "every session's data is deleted" in second.stdout.read()
        assert not _folders(work, second.pid), "a stopped server deletes its folder"
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(30)
        client.close()


def test_another_web_server_on_the_port_is_named_as_such(server):
    """`--server` pointed at some other web server: one clear line, not a JSON decoder's complaint."""
    from sslmedsam2.remote.client import ServerError

    httpd, handler = server
    handler.body = b"<html>a web page</html>"
    client = Client(f"http://127.0.0.1:{httpd.server_address[1]}")
    with pytest.raises(ServerError, match="something other than JSON; is it an SSLMedSAM2 server"):
        client.health()
    client.close()
