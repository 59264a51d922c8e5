"""What a server holds stays within its limits after the unusual paths too: a propagation cancelled half-way
through encoding, a closed session whose job has ended, a label download racing a close."""

from __future__ import annotations

import gc
import weakref

import pytest
import SimpleITK as sitk
from conftest import TINY_SIZE, seeds_on, synthetic_case, to_image

from sslmedsam2.propagation.features import frame_feature_bytes
from sslmedsam2.propagation.predictor import SlicePredictor
from sslmedsam2.remote.client import Client, JobCancelled
from sslmedsam2.server.errors import SessionGone
from sslmedsam2.server.limits import ServerSettings
from sslmedsam2.server.main import serve_in_thread
from sslmedsam2.session.remote import RemoteSession

OPEN = {"model": "sam2.1-tiny", "image_size": TINY_SIZE}


def _settings(checkpoint, tmp_path, **extra) -> ServerSettings:
    return ServerSettings(port=0, device="cpu", model="sam2.1-tiny", checkpoint=checkpoint, image_size=TINY_SIZE,
                          workdir=tmp_path, **extra)


@pytest.fixture
def volume_bytes(tmp_path):
    image, labels = synthetic_case(shape=(10, 32, 32))
    path = tmp_path / "a.nii.gz"
    sitk.WriteImage(to_image(image), str(path))
    seeds = seeds_on(labels, {1: [3, 6]})
    return path.read_bytes(), {z: seeds[z] for z in (3, 6)}


def test_a_volume_left_half_encoded_by_a_cancel_still_keeps_the_budget(tiny_checkpoint, tmp_path, monkeypatch,
                                                                       volume_bytes):
    data, planes = volume_bytes
    settings = _settings(tiny_checkpoint, tmp_path, memory_budget=int(frame_feature_bytes(TINY_SIZE) * 10 * 1.5))
    with serve_in_thread(settings) as (url, service):
        client = Client(url)
        a, b = RemoteSession(client, data, "a.nii.gz", **OPEN), RemoteSession(client, data, "b.nii.gz", **OPEN)
        encoded = []
        original = SlicePredictor.forward_image

        def cancelling(self, image):  # the user cancels a's first propagation after two slices
            encoded.append(image.shape[0])
            if len(encoded) == 2:
                for job in service.runner.active():
                    job.cancel()
            return original(self, image)

        monkeypatch.setattr(SlicePredictor, "forward_image", cancelling)
        with pytest.raises(JobCancelled):
            a.propagate(planes)
        monkeypatch.undo()
        assert 0 < client.session(a.id)["feature_bytes"] < frame_feature_bytes(TINY_SIZE) * 10
        b.propagate(planes)
        a.propagate(planes)  # encodes a's other eight slices: b must give its features up first
        assert client.info()["memory"]["features_bytes"] <= settings.memory_budget
        assert client.session(b.id)["feature_bytes"] == 0
        client.close()


def test_a_closed_session_is_released_once_its_job_has_ended(tiny_checkpoint, tmp_path, volume_bytes):
    data, planes = volume_bytes
    with serve_in_thread(_settings(tiny_checkpoint, tmp_path)) as (url, service):
        client = Client(url)
        volume = RemoteSession(client, data, "a.nii.gz", **OPEN)
        volume.propagate(planes)
        session = weakref.ref(service._sessions[volume.id])
        volume.close()
        gc.collect()
        assert session() is None, "the finished job (kept an hour for its status) holds nothing of the session"
        client.close()


def test_a_label_download_racing_a_close_answers_session_gone(tiny_checkpoint, tmp_path, volume_bytes, monkeypatch):
    data, planes = volume_bytes
    with serve_in_thread(_settings(tiny_checkpoint, tmp_path)) as (url, service):
        client = Client(url)
        volume = RemoteSession(client, data, "a.nii.gz", **OPEN)
        volume.propagate(planes)
        session = service._sessions[volume.id]
        from sslmedsam2.server import service as service_module

        write = service_module.write_image

        def closed_meanwhile(image, path, **options):  # the close lands while the label map is being written
            with service._lock:
                service._drop(session)
            write(image, path, **options)

        monkeypatch.setattr(service_module, "write_image", closed_meanwhile)
        with pytest.raises(SessionGone, match="open the volume again"):
            service.labels_file("local", volume.id)
        with pytest.raises(SessionGone):
            service.confidence_csv("local", volume.id)
        client.close()


def test_an_internal_error_is_a_tagged_one_line_answer(tiny_checkpoint, tmp_path, monkeypatch):
    """A bug answers 500 with one line and the instance header (a client tells a restarted server by it)."""
    import requests

    from sslmedsam2.server.app import INSTANCE_HEADER

    with serve_in_thread(_settings(tiny_checkpoint, tmp_path)) as (url, service):
        monkeypatch.setattr(service, "info", lambda owner: 1 / 0)
        answer = requests.get(url + "/info", timeout=30)
        assert answer.status_code == 500 and answer.json() == {
            "error": "internal error: ZeroDivisionError (the server keeps running; see its log)", "code": "internal"}
        assert answer.headers[INSTANCE_HEADER] == service.instance
        assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"


def test_a_session_whose_client_left_during_the_upload_is_closed(tiny_checkpoint, tmp_path, monkeypatch,
                                                                 volume_bytes):
    """Ctrl-C or a timeout after the image was sent: the session the client never heard of does not stay open."""
    import time

    import requests

    data, _ = volume_bytes
    with serve_in_thread(_settings(tiny_checkpoint, tmp_path)) as (url, service):
        opening = service.open_session

        def slow(*args, **kwargs):
            opened = opening(*args, **kwargs)
            time.sleep(1.5)
            return opened

        monkeypatch.setattr(service, "open_session", slow)
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(url + "/sessions", params={"name": "a.nii.gz", **OPEN}, data=data, timeout=0.5)
        deadline = time.monotonic() + 10
        while service.info("local")["sessions"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert service.info("local")["sessions"] == 0 and list(service.root.iterdir()) == []
