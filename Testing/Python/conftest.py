"""Shared fixtures: synthetic volumes, a random-weight SAM2 checkpoint, and the optional real data."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHARED_DATA = Path(os.environ.get("SSLMEDSAM2_SHARED_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
TINY_SIZE = 128  # SAM2 image size for tests: real Hiera-T architecture, small input


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's weight cache, never reach the internet from a test."""
    monkeypatch.setenv("SSLMEDSAM2_CACHE", str(tmp_path_factory.mktemp("weights")))
    monkeypatch.setenv("SSLMEDSAM2_MIRROR", "http://127.0.0.1:9/")  # discard port: nothing listens


SCHEDULER_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_COUNT",
                       "SLURM_ARRAY_TASK_STEP", "LSB_JOBINDEX", "LSB_JOBINDEX_END", "LSB_JOBINDEX_STEP", "SGE_TASK_ID",
                       "SGE_TASK_FIRST", "SGE_TASK_LAST", "SGE_TASK_STEPSIZE", "PBS_ARRAY_INDEX", "PBS_ARRAYID")


@pytest.fixture(autouse=True)
def _not_an_array_job(monkeypatch):
    """A suite run inside a scheduler's array job must not shard the commands it tests (their default shard comes
    from these variables)."""
    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True, scope="session")
def _suite_itk_worker(tmp_path_factory):
    """The suite's shared ITK worker lives in a folder of its own, idles out soon, and is stopped at the end:
    no test reuses the user's worker, and none is left running after the suite."""
    from sslmedsam2.interpolation import shared_worker

    directory = tmp_path_factory.mktemp("itk")
    directory.chmod(0o700)
    saved = {name: os.environ.get(name) for name in (shared_worker.DIR_ENV, shared_worker.IDLE_ENV)}
    os.environ[shared_worker.DIR_ENV] = str(directory)  # os.environ, not monkeypatch: subprocesses inherit it
    os.environ[shared_worker.IDLE_ENV] = "120"
    yield directory
    shared_worker.stop_all(directory)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def synthetic_case(shape=(24, 48, 48), seed=0):
    """An MR-like volume with two labelled blobs; returns (image array, label array), numpy z, y, x order."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    labels[ellipsoid(shape, (11, 18, 18), (8, 9, 11))] = 1
    labels[ellipsoid(shape, (13, 32, 31), (6, 7, 6))] = 2
    image = 100 + 20 * rng.standard_normal(shape)
    image[labels == 1] += 300
    image[labels == 2] += 180
    image[:, :3, :] = 0  # background air, as in MRI
    return image.astype(np.float32), labels


def to_image(array: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 5.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def seeds_on(labels: np.ndarray, slices: dict[int, list[int]]) -> np.ndarray:
    """Keep label L only on the listed slices (numpy axis 0)."""
    seeds = np.zeros_like(labels)
    for label, zs in slices.items():
        for z in zs:
            seeds[z][labels[z] == label] = label
    return seeds


@pytest.fixture
def case_files(tmp_path):
    """(image path, seeds path, full label path) of a synthetic case with seeds on several slices, two labels."""
    image, labels = synthetic_case()
    seeds = seeds_on(labels, {1: [6, 11, 16], 2: [10, 15]})
    paths = tmp_path / "image.nii.gz", tmp_path / "seeds.nii.gz", tmp_path / "labels.nii.gz"
    for array, path in zip((image, seeds, labels), paths):
        sitk.WriteImage(to_image(array), str(path))
    return paths


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Real SAM2.1 Hiera-T architecture from sam2's packaged config, random weights, saved as users' files are."""
    import torch

    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor

    torch.manual_seed(0)
    predictor = build_predictor(get_model("sam2.1-tiny"), None, "cpu", TINY_SIZE)
    path = tmp_path_factory.mktemp("ckpt") / "tiny_random.pt"
    torch.save({"model": predictor.state_dict()}, path)
    return path


def table_lines(source) -> list[str]:
    """A table this tool wrote (a path or its text), without its first line, the mark that says so."""
    text = source if isinstance(source, str) else Path(source).read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines and lines[0].startswith("# sslmedsam2 "), lines[:1]
    return lines[1:]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(process, client, timeout: float = 180) -> None:
    """Until a `serve` process answers its health check; fails the test if it ends or does not start."""
    import time

    from sslmedsam2.remote.client import ServerUnreachable

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if process.poll() is not None:
            pytest.fail(f"serve ended with {process.returncode}: {process.stdout.read()}")
        try:
            client.health()
            return
        except ServerUnreachable:
            time.sleep(0.2)
    pytest.fail("serve did not start")


def shared_dataset(name: str) -> Path:
    folder = SHARED_DATA / name
    if not (folder / "images").is_dir():
        pytest.skip(f"real data {folder} is absent (it sits beside the project in development and CI only)")
    return folder


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    body = PAYLOAD
    truncate = False

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[: len(self.body) // 3] if self.truncate else self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    handler = type("Handler", (_Handler,), {})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("SSLMEDSAM2_MIRROR", f"http://127.0.0.1:{httpd.server_address[1]}/files")
    yield httpd, handler
    httpd.shutdown()
    httpd.server_close()


def coloured_pixels(png: Path) -> int:
    """How many pixels of a picture this tool drew are coloured (images and text are grey or white: a label)."""
    from PIL import Image

    from sslmedsam2.labelmap.pictures import is_our_picture

    assert is_our_picture(png), png
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 40).sum())


@pytest.fixture(scope="module")
def engine_server(tiny_checkpoint, tmp_path_factory):
    """A `serve` in this process (random-weight tiny SAM2 on the CPU) and a client of it."""
    from sslmedsam2.remote.client import Client
    from sslmedsam2.server.limits import ServerSettings
    from sslmedsam2.server.main import serve_in_thread

    settings = ServerSettings(port=0, device="cpu", model="sam2.1-tiny", checkpoint=tiny_checkpoint,
                              image_size=TINY_SIZE, workdir=tmp_path_factory.mktemp("server"))
    with serve_in_thread(settings) as (url, _):
        client = Client(url)
        yield client
        client.close()
