"""The interactive server (FastAPI on uvicorn, on 127.0.0.1 inside the test) with the random-weight SAM2: the same
answers as a cold `sslmedsam2 propagate`, first and after an edit, with only the tracking run again; two clients at
once; cancel; the memory budget; every bad input answered with a 4xx one-line JSON error while serving goes on."""

from __future__ import annotations

import base64
import csv
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from conftest import TINY_SIZE, seeds_on, synthetic_case, table_lines, to_image

from sslmedsam2.cli import main
from sslmedsam2.errors import UserError
from sslmedsam2.propagation.predictor import SlicePredictor
from sslmedsam2.remote.client import Client, JobCancelled, JobFailed, ServerError, SessionGone
from sslmedsam2.server.limits import MB, ServerSettings
from sslmedsam2.server.main import serve_in_thread
from sslmedsam2.server.service import Service
from sslmedsam2.remote.wire import encode_array, slice_entry
from sslmedsam2.session.remote import RemoteSession
from sslmedsam2.labelmap.confidence import confidence_text

MODEL = ["--model", "sam2.1-tiny", "--image-size", str(TINY_SIZE)]
OPEN = {"model": "sam2.1-tiny", "image_size": TINY_SIZE}
NUMBERS = ("presence", "certainty", "agreement", "confidence")


def _settings(checkpoint, tmp_path, **extra) -> ServerSettings:
    return ServerSettings(port=0, device="cpu", model="sam2.1-tiny", checkpoint=checkpoint, image_size=TINY_SIZE,
                          workdir=tmp_path, **extra)


@pytest.fixture(scope="module")
def engine_server(tiny_checkpoint, tmp_path_factory):
    with serve_in_thread(_settings(tiny_checkpoint, tmp_path_factory.mktemp("server"))) as (url, service):
        yield url, service


@pytest.fixture
def client(engine_server):
    c = Client(engine_server[0])
    yield c
    c.close()


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _planes(seeds: np.ndarray) -> dict[int, np.ndarray]:
    return {int(z): seeds[z] for z in np.flatnonzero(seeds.any(axis=(1, 2)))}


def _rows(text: str) -> dict:
    return {(r["slice"], r["label"]): r for r in csv.DictReader(table_lines(text))}


def assert_same_table(a: str, b: str) -> None:
    """Same rows, same sources and voxel counts; probabilities within 1e-4 (the CSV keeps 4 decimals)."""
    rows_a, rows_b = _rows(a), _rows(b)
    assert rows_a.keys() == rows_b.keys()
    for key, row in rows_a.items():
        other = rows_b[key]
        assert (row["source"], row["present"], row["voxels"]) == (other["source"], other["present"], other["voxels"])
        for name in NUMBERS:
            if row[name] or other[name]:
                assert abs(float(row[name]) - float(other[name])) <= 1e-4 + 1e-9, (key, name, row, other)


def _cold(image: Path, seeds: Path, out: Path, checkpoint) -> tuple[np.ndarray, str]:
    """The local command, run on a thread like the test server's worker: when other jobs load the 2 shared cores,
    torch's OpenMP team of the main thread spins so hard that it is several times slower (the answer is the same)."""
    codes = []
    worker = threading.Thread(target=lambda: codes.append(main(
        ["propagate", str(image), str(seeds), "-o", str(out), "--method", "sam2", "--checkpoint", str(checkpoint),
         "--device", "cpu", *MODEL])))
    worker.start()
    worker.join()
    assert codes == [0]
    return _array(out), out.with_name(f"{out.name[:-7]}.confidence.csv").read_text()


def _count_encodes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = SlicePredictor.forward_image

    def counting(self, image):
        calls.append(image.shape[0])
        return original(self, image)

    monkeypatch.setattr(SlicePredictor, "forward_image", counting)
    return calls


def test_same_as_cold_propagate_first_and_after_an_edit(case_files, tiny_checkpoint, client, engine_server, tmp_path,
                                                        monkeypatch):
    image, seeds_path, labels_path = case_files
    seeds, labels = _array(seeds_path), _array(labels_path)
    cold_labels, cold_table = _cold(image, seeds_path, tmp_path / "cold.nii.gz", tiny_checkpoint)

    calls = _count_encodes(monkeypatch)
    with RemoteSession(client, image.read_bytes(), image.name, **OPEN) as volume:
        assert volume.info["array_axis"] == 0 and volume.info["slices"] == 24
        first = volume.propagate(_planes(seeds))
        assert sum(calls) == 24, "each slice is encoded once"
        np.testing.assert_array_equal(first.labels, cold_labels)
        assert_same_table(confidence_text(first.confidence), cold_table)

        # a corrected slice in the middle: only it is sent, only the tracking runs again
        corrected = np.where(labels[13] == 1, 1, 0).astype(np.uint8)
        edited = seeds.copy()
        edited[13][labels[13] == 1] = 1
        sitk.WriteImage(to_image(edited), str(tmp_path / "edited.nii.gz"))
        again = volume.propagate({13: corrected}, replace=False, mode="exact")  # exact: what a cold run computes
        assert sum(calls) == 24, "a re-propagation encoded slices again"
        assert again.number == first.number + 1
        cold_edit, cold_edit_table = _cold(image, tmp_path / "edited.nii.gz", tmp_path / "cold_edit.nii.gz",
                                           tiny_checkpoint)
        np.testing.assert_array_equal(again.labels, cold_edit)
        assert_same_table(confidence_text(again.confidence), cold_edit_table)
        assert not np.array_equal(cold_edit, cold_labels)

        # the label map file on the image grid, written by the engine's writer
        nifti = tmp_path / "from_server.nii.gz"
        nifti.write_bytes(client.labels_file(volume.id))
        served, reference = sitk.ReadImage(str(nifti)), sitk.ReadImage(str(tmp_path / "cold_edit.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(served), cold_edit)
        assert served.GetSize() == reference.GetSize() and np.allclose(served.GetOrigin(), reference.GetOrigin())
        from sslmedsam2.labelmap.confidence import check_pair, confidence_path

        confidence_path(nifti).write_text(client.confidence(volume.id))
        check_pair(nifti)  # the served label map and table carry one result id
        confidence_path(nifti).write_text(confidence_text(again.confidence, "0123456789abcdef"))
        with pytest.raises(UserError, match="does not belong"):
            check_pair(nifti)
        session_folder = engine_server[1].root / volume.id
        assert session_folder.is_dir() and not any(session_folder.iterdir()), "results are not left on disk"
    assert not session_folder.exists(), "closing a session deletes its folder"

    # `propagate --server`: the same files as the local command
    out = tmp_path / "remote.nii.gz"
    assert main(["propagate", str(image), str(seeds_path), "-o", str(out), "--server", engine_server[0], *MODEL]) == 0
    np.testing.assert_array_equal(_array(out), cold_labels)
    assert sitk.ReadImage(str(out)).GetOrigin() == sitk.ReadImage(str(tmp_path / "cold.nii.gz")).GetOrigin()
    assert_same_table((tmp_path / "remote.confidence.csv").read_text(), cold_table)


def test_two_clients_at_once(engine_server, tmp_path):
    server = engine_server
    images, answers, errors = {}, {}, []
    for k in (0, 1):
        image, labels = synthetic_case(shape=(10, 32, 32), seed=k)
        path = tmp_path / f"case{k}.nii.gz"
        sitk.WriteImage(to_image(image), str(path))
        images[k] = path, _planes(seeds_on(labels, {1: [3, 6], 2: [4 + k]}))

    def one(k: int) -> None:
        c = Client(server[0])
        try:
            path, planes = images[k]
            with RemoteSession(c, path.read_bytes(), path.name, **OPEN) as volume:
                answers[k] = volume.propagate(planes).labels
                answers[k, "again"] = volume.propagate(planes).labels
        except Exception as exc:
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=one, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    for k in (0, 1):
        np.testing.assert_array_equal(answers[k], answers[k, "again"])
    assert not np.array_equal(answers[0], answers[1])
    assert server[1].info("local")["sessions"] == 0


def test_cancel_stops_a_propagation_and_keeps_the_previous_result(client, tmp_path, monkeypatch):
    image, labels = synthetic_case(shape=(12, 32, 32))
    path = tmp_path / "slow.nii.gz"
    sitk.WriteImage(to_image(image), str(path))
    planes = _planes(seeds_on(labels, {1: [4, 7]}))
    with RemoteSession(client, path.read_bytes(), path.name, **OPEN) as volume:
        done = volume.propagate(planes)
        original = SlicePredictor._run_single_frame_inference

        def slow(self, *args, **kwargs):
            time.sleep(0.3)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(SlicePredictor, "_run_single_frame_inference", slow)
        job = client.propagate(volume.id, {5: planes[4]}, replace=False)
        with pytest.raises(ServerError, match="already propagating"):
            client.propagate(volume.id, planes)
        started = time.perf_counter()
        client.cancel(job["job"])
        with pytest.raises(JobCancelled, match="cancelled"):
            client.wait(job["job"])
        assert time.perf_counter() - started < 5
        monkeypatch.undo()
        labels_now, result = client.labels(volume.id)
        assert result == done.number and client.session(volume.id)["prompt_slices"] == sorted(planes)
        np.testing.assert_array_equal(labels_now, done.labels)
        assert volume.propagate(planes).number == done.number + 1, "the session works after a cancel"


def test_memory_budget_evicts_the_least_recently_used(tiny_checkpoint, tmp_path, monkeypatch):
    from sslmedsam2.propagation.features import frame_feature_bytes

    per_volume = frame_feature_bytes(TINY_SIZE) * 10
    settings = _settings(tiny_checkpoint, tmp_path, memory_budget=int(per_volume * 1.5))
    calls = _count_encodes(monkeypatch)
    with serve_in_thread(settings) as (url, service):
        c = Client(url)
        image, labels = synthetic_case(shape=(10, 32, 32))
        data = _bytes(tmp_path, image, "a.nii.gz")
        planes = _planes(seeds_on(labels, {1: [3, 6]}))
        a, b = RemoteSession(c, data, "a.nii.gz", **OPEN), RemoteSession(c, data, "b.nii.gz", **OPEN)
        a.propagate(planes)
        b.propagate(planes)
        assert sum(calls) == 20
        assert c.session(a.id)["feature_bytes"] == 0, "the least recently used volume gave its features up"
        assert c.session(b.id)["feature_bytes"] == per_volume
        assert c.info()["memory"]["features_bytes"] <= settings.memory_budget
        b.propagate(planes, mode="exact")  # exact: every slice's features are read again
        assert sum(calls) == 20, "the volume that kept its features did not encode again"
        a.propagate(planes, mode="exact")
        assert sum(calls) == 30 and c.session(b.id)["feature_bytes"] == 0

        big, _ = synthetic_case(shape=(16, 32, 32))
        with pytest.raises(ServerError, match="memory budget") as refused:
            RemoteSession(c, _bytes(tmp_path, big, "big.nii.gz"), "big.nii.gz", **OPEN)
        assert refused.value.status == 413
        c.close()


def _bytes(folder: Path, array: np.ndarray, name: str, **geometry) -> bytes:
    path = folder / name
    sitk.WriteImage(to_image(array, **geometry), str(path))
    return path.read_bytes()


def _cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    return capsys.readouterr().err.strip().splitlines()[-1].removeprefix("sslmedsam2: error: ")


def _bad_image(folder: Path, kind: str) -> Path:
    if kind == "corrupt":
        path = folder / "image.nii.gz"
        path.write_bytes(b"\x1f\x8b garbage that is not gzip nor nifti" * 10)
    elif kind == "not-an-image":
        path = folder / "notes.txt"
        path.write_text("hello")
    elif kind == "2D":
        path = folder / "flat.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((24, 24), np.float32)), str(path))
    elif kind == "4D":
        path = folder / "four.nii.gz"
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 10, 24, 24), np.float32), isVector=False), str(path))
    else:
        image, _ = synthetic_case(shape=(10, 24, 24))
        image[3, 4, 5] = np.nan
        path = folder / "nan.mha"
        sitk.WriteImage(to_image(image), str(path))
    return path


@pytest.mark.parametrize("kind", ["corrupt", "not-an-image", "2D", "4D", "NaN"])
def test_bad_images_get_the_command_lines_message(kind, client, tmp_path, capsys, monkeypatch, tiny_checkpoint):
    path = _bad_image(tmp_path, kind)
    seeds = tmp_path / "seeds.nii.gz"
    sitk.WriteImage(to_image(np.ones((10, 24, 24), np.uint8)), str(seeds))
    monkeypatch.chdir(tmp_path)
    expected = _cli_error(capsys, ["propagate", path.name, seeds.name, "-o", "out.nii.gz", "--method", "sam2",
                                   "--checkpoint", str(tiny_checkpoint), *MODEL])
    with pytest.raises(ServerError) as refused:
        client.open_session(path.read_bytes(), path.name, **OPEN)
    assert refused.value.status == 400
    assert str(refused.value) == expected
    assert client.health()["status"] == "ok"


def _raw(url: str, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, url + path, timeout=60, **kwargs)


def test_every_bad_request_is_a_4xx_line_and_the_server_keeps_serving(engine_server, client, tmp_path):
    url, service = engine_server
    image, labels = synthetic_case(shape=(10, 24, 24))
    data = _bytes(tmp_path, image, "image.nii.gz")
    session = client.open_session(data, "image.nii.gz", **OPEN)["session"]
    plane = labels[5]
    good = slice_entry(5, plane)
    many = np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) % 60
    cases = [
        ("POST", "/sessions", dict(params={"model": "sam3-huge"}, data=data), 400, "unknown model"),
        ("POST", "/sessions", dict(params={"image_size": 100}, data=data), 400, "multiple of 16"),
        ("POST", "/sessions", dict(params={"image_size": "big"}, data=data), 400, "image_size"),
        ("POST", "/sessions", dict(params={"axis": "oblique"}, data=data), 400, "unknown axis"),
        ("POST", "/sessions", dict(params={"modality": "pet"}, data=data), 400, "unknown modality"),
        ("POST", "/sessions", dict(params={"modality": "ct", "window": "x"}, data=data), 400, "unknown CT window"),
        ("POST", "/sessions", dict(params={"range_min": 5, "range_max": 1}, data=data), 400, "must be above"),
        ("POST", "/sessions", dict(params={"encoding": "gzip"}, data=b"not gzip"), 400, "not gzip"),
        ("POST", "/sessions", dict(data=b""), 400, "no image"),
        ("POST", f"/sessions/{session}/propagate", dict(data=b"{not json"), 400, "bad request"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [{"index": "x"}]}), 400, "bad request"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [good], "extra": 1}), 400, "extra"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": []}), 400, "no labelled voxel"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [slice_entry(5, np.zeros_like(plane))]}),
         400, "no labelled voxel"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [slice_entry(10, plane)]}), 400, "outside"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [good, good]}), 400, "twice"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [slice_entry(5, plane[:, :20])]}), 400,
         "decodes to"),
        ("POST", f"/sessions/{session}/propagate",
         dict(json={"slices": [{"index": 5, "dtype": "uint8", "data": encode_array(np.zeros((48, 48), np.uint8))}]}),
         400, "more than"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [{**good, "data": "%%%"}]}), 400, "base64"),
        ("POST", f"/sessions/{session}/propagate",
         dict(json={"slices": [{**good, "data": base64.b64encode(b"not zlib at all").decode()}]}), 400,
         "not zlib-compressed"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [slice_entry(5, plane.astype(np.float32))]}),
         400, "not a label type"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [slice_entry(5, many)]}), 400,
         "distinct labels"),
        ("POST", f"/sessions/{session}/propagate", dict(json={"slices": [slice_entry(5, -plane.astype(np.int16))]}),
         400, "negative"),
        ("POST", "/sessions/nope/propagate", dict(json={"slices": [good]}), 404, "no open session"),
        ("GET", f"/sessions/{session}/labels", {}, 409, "no result yet"),
        ("GET", f"/sessions/{session}/labels", dict(params={"format": "png"}), 400, "unknown label map format"),
        ("GET", "/jobs/nope", {}, 404, "no job"),
        ("GET", "/jobs/nope", dict(params={"wait": 100}), 400, "wait"),
        ("DELETE", "/sessions/nope", {}, 404, "no open session"),
        ("GET", "/no/such/route", {}, 404, "Not Found"),
        ("PUT", "/health", {}, 405, "Method Not Allowed"),
    ]
    for method, path, kwargs, status, fragment in cases:
        answer = _raw(url, method, path, **kwargs)
        assert answer.status_code == status, (path, kwargs.get("params"), answer.text)
        body = answer.json()
        assert set(body) == {"error", "code"} and "\n" not in body["error"], body
        assert fragment.lower() in body["error"].lower(), (fragment, body)
        assert _raw(url, "GET", "/health").json()["status"] == "ok"
    assert client.session(session)["prompt_slices"] == [], "refused requests change no prompts"

    # a header that points at another file of the server is refused before any reader follows it
    detached = {"evil.nrrd": b"NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
                             b"data file: /etc/hostname\n\n",
                "evil.mha": b"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_FLOAT\n"
                            b"ElementDataFile = /etc/hostname\n"}
    for name, header in detached.items():
        with pytest.raises(ServerError, match="separate data file") as refused:
            client.open_session(header, name, **OPEN)
        assert refused.value.status == 400
    plain = tmp_path / "plain.nii"  # sent gzip-compressed, stored and read as .nii
    sitk.WriteImage(to_image(image), str(plain))
    opened = client.open_session(plain.read_bytes(), plain.name, **OPEN)
    assert opened["slices"] == 10
    client.close_session(opened["session"])

    # weights the server cannot get: the job fails with the command line's line, the server goes on
    other = client.open_session(data, "image.nii.gz", model="medsam2", image_size=TINY_SIZE)["session"]
    job = client.propagate(other, {5: plane})
    with pytest.raises(JobFailed, match="by hand"):
        client.wait(job["job"])
    result = client.wait(client.propagate(session, {5: plane})["job"])
    assert result["state"] == "done" and result["labels"] == [int(v) for v in np.unique(plane) if v]
    assert service.info("local")["jobs_active"] == 0
    for sid in (session, other):
        client.close_session(sid)
    with pytest.raises(SessionGone, match="open the volume again"):
        client.labels(session)


def test_limits_sessions_expiry_and_request_size(tiny_checkpoint, tmp_path):
    settings = _settings(tiny_checkpoint, tmp_path, max_sessions=2, idle_timeout_s=60, max_request_bytes=MB)
    with serve_in_thread(settings) as (url, service):
        c = Client(url)
        image, _ = synthetic_case(shape=(6, 16, 16))
        data = _bytes(tmp_path, image, "small.nii.gz")
        first = c.open_session(data, "small.nii.gz", **OPEN)["session"]
        c.open_session(data, "small.nii.gz", **OPEN)
        with pytest.raises(ServerError, match="limit") as refused:
            c.open_session(data, "small.nii.gz", **OPEN)
        assert refused.value.status == 409
        folder = service.root / first
        assert folder.is_dir() and oct(folder.stat().st_mode & 0o777) == "0o700"
        assert service.expire(now=time.monotonic() + 61) and not folder.exists()
        assert c.info()["sessions"] == 0
        with pytest.raises(SessionGone):
            c.session(first)
        answer = _raw(url, "POST", "/sessions", params={"name": "x.nii.gz"}, data=b"\0" * (2 * MB))
        assert answer.status_code == 413 and "limit" in answer.json()["error"]
        assert c.health()["status"] == "ok"
        c.close()
    assert not service.root.exists(), "stopping the server deletes its folder"


def test_a_server_that_cannot_load_its_weights_does_not_start(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    with pytest.raises(UserError, match="not a readable"):
        Service(_settings(bad, tmp_path)).start()
    assert not list(tmp_path.glob(".sslmedsam2-server*")), "nothing is left behind"


@pytest.mark.parametrize("kind", ["missing image", "seeds on another grid", "output cannot be written"])
def test_propagate_server_checks_its_inputs_as_the_local_command(kind, engine_server, tmp_path, capsys, monkeypatch,
                                                                 tiny_checkpoint):
    image, labels = synthetic_case(shape=(10, 24, 24))
    sitk.WriteImage(to_image(image), str(tmp_path / "image.nii.gz"))
    seeds = labels if kind != "seeds on another grid" else np.ones((10, 24, 25), np.uint8)
    sitk.WriteImage(to_image(seeds), str(tmp_path / "seeds.nii.gz"))
    monkeypatch.chdir(tmp_path)
    argv = ["propagate", "nope.nii.gz" if kind == "missing image" else "image.nii.gz", "seeds.nii.gz", "-o",
            "no/such/out.nii.gz" if kind == "output cannot be written" else "out.nii.gz", *MODEL]
    local = _cli_error(capsys, [*argv, "--method", "sam2", "--checkpoint", str(tiny_checkpoint)])
    assert _cli_error(capsys, [*argv, "--server", engine_server[0]]) == local
    assert not list(tmp_path.glob("out*")) and engine_server[1].info("local")["sessions"] == 0


@pytest.mark.parametrize("extra, fragment", [
    (["--server", "http://127.0.0.1:9"], "cannot reach the SSLMedSAM2 server at http://127.0.0.1:9"),
    (["--server", "127.0.0.1:8765"], "http://HOST:PORT"),
    (["--server", "http://[::1"], "http://HOST:PORT"),
    (["--server", "http://127.0.0.1:99999"], "http://HOST:PORT"),
    (["--method", "interpolate", "--server", "http://127.0.0.1:9"], "leave out --server"),
    (["--checkpoint", "x.pt", "--server", "http://127.0.0.1:9"], "leave out --checkpoint"),
    (["--token-file", "t"], "goes with --server"),
])
def test_propagate_server_refusals(extra, fragment, case_files, tmp_path, capsys):
    image, seeds, _ = case_files
    out = tmp_path / "out.nii.gz"
    message = _cli_error(capsys, ["propagate", str(image), str(seeds), "-o", str(out), *extra])
    assert fragment in message and not out.exists()


def test_wire_data_is_plain_zlib_whichever_side_has_isal(monkeypatch):
    """The server compresses with ISA-L where python-isal is installed; a client without it (standard zlib) reads
    that, and the other way round."""
    import zlib

    from sslmedsam2.remote import wire

    labels = np.zeros((7, 40, 30), np.uint8)
    labels[2:5, 10:20, 5:25] = 3
    for writer, reader in ((wire.compressing, zlib), (zlib, wire.compressing)):
        monkeypatch.setattr(wire, "compressing", writer)
        data = wire.encode_array(labels)
        monkeypatch.setattr(wire, "compressing", reader)
        np.testing.assert_array_equal(wire.decode_array(data, "uint8", labels.shape), labels)
    assert zlib.decompress(base64.b64decode(data)) == labels.tobytes()
