"""Hostile uploads: a server holding patient images reads no other file, and a small body cannot inflate into
gigabytes of disk or memory. Each is refused with a one-line 4xx answer and the server goes on serving."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from conftest import TINY_SIZE, to_image

from sslmedsam2.server.limits import ServerSettings
from sslmedsam2.server.main import serve_in_thread

OPEN = {"model": "sam2.1-tiny", "image_size": TINY_SIZE}


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    settings = ServerSettings(port=0, device="cpu", model="sam2.1-tiny", checkpoint=tiny_checkpoint,
                              image_size=TINY_SIZE, workdir=root)
    with serve_in_thread(settings) as (url, service):
        yield url, service


def _upload(url: str, data: bytes, name: str, **params) -> requests.Response:
    return requests.post(url + "/sessions", params={"name": name, **OPEN, **params}, data=data, timeout=120)


def _refused(answer: requests.Response, status: int, fragment: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "code"} and "\n" not in body["error"], body
    assert fragment in body["error"], body


def _nifti(folder: Path, shape: tuple[int, int, int], dtype=np.float32) -> bytes:
    path = folder / "plain.nii"
    sitk.WriteImage(to_image(np.random.default_rng(0).integers(0, 200, shape).astype(dtype)), str(path))
    return path.read_bytes()


def test_gzip_bodies_inflate_no_further_than_their_header_declares(server, tmp_path):
    url, service = server
    image = _nifti(tmp_path, (80, 64, 64))  # 1.3 MB: past the first MB, so the header bounds the rest
    opened = _upload(url, gzip.compress(image, compresslevel=1), "plain.nii", encoding="gzip")
    assert opened.status_code == 201, opened.text
    assert requests.delete(f"{url}/sessions/{opened.json()['session']}", timeout=30).status_code == 200

    # 64 MB of zeros after a valid header: a 64 kB body
    bomb = gzip.compress(_nifti(tmp_path, (4, 8, 8)) + bytes(64 << 20), compresslevel=9)
    _refused(_upload(url, bomb, "bomb.nii", encoding="gzip"), 413, "decompresses to more than its image header")
    # the same as a .nii.gz file sent as it is: the engine's NIfTI reader stops as early
    _refused(_upload(url, bomb, "bomb.nii.gz"), 400, "decompresses to more than its header declares")
    # no image header in the first MB: nothing to bound the rest by
    _refused(_upload(url, gzip.compress(bytes(8 << 20)), "zeros.nii", encoding="gzip"), 400, "no image header")
    assert list(service.root.iterdir()) == [], "a refused upload leaves nothing behind"
    assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_a_data_file_named_anywhere_in_a_long_header_is_refused(server):
    url, service = server
    nrrd = (b"NRRD0004\n# " + b"x" * 70_000 + b"\ntype: float\ndimension: 3\nsizes: 2 2 2\nencoding: raw\n"
            b"data file: /etc/hostname\n\n")
    mha = b"ObjectType = Image\n" + b"Comment = padding the header past the first 64 kB\n" * 1500 \
        + b"NDims = 3\nDimSize = 2 2 2\nElementType = MET_FLOAT\nElementDataFile = /etc/hostname\n"
    for name, header in (("evil.nrrd", nrrd), ("evil.mha", mha)):
        _refused(_upload(url, header, name), 400, "separate data file")
        _refused(_upload(url, gzip.compress(header), name, encoding="gzip"), 400, "separate data file")
    endless = b"NRRD0004\n" + b"# a comment line\n" * 70_000  # no end of header within the first MB
    _refused(_upload(url, endless, "long.nrrd"), 400, "header is longer than 1 MB")
    assert list(service.root.iterdir()) == []


def test_a_name_cannot_add_lines_to_an_error(server):
    url, _ = server
    _refused(_upload(url, b"garbage, not an image", "evil\nsecond line.nii.gz"), 400, "evil")
