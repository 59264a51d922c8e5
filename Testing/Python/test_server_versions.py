"""A client and a server that speak other HTTP API versions: the client refuses in one line naming both, before it
uploads anything (the command line's `propagate --server` and the Slicer module go through the same session)."""

from __future__ import annotations

import http.server
import json
import threading

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import seeds_on, synthetic_case, to_image

from sslmedsam2 import __version__
from sslmedsam2.cli import main
from sslmedsam2.remote.client import Client, ServerError
from sslmedsam2.remote.wire import API_VERSION
from sslmedsam2.session.remote import RemoteSession


class _OtherServer(http.server.BaseHTTPRequestHandler):
    """/health of a server with another API version; every other request is recorded and refused."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path != "/health":
            return self._refuse()
        body = json.dumps(self.server.health).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self._refuse()

    def _refuse(self) -> None:
        self.server.other.append(f"{self.command} {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def other_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtherServer)
    httpd.other = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("health, says", [
    ({"status": "ok", "version": "0.9.0", "api": API_VERSION + 1, "instance": "a"},
     f"is version 0.9.0 with API {API_VERSION + 1}"),
    ({"status": "ok", "version": "0.0.9", "instance": "b"}, "is version 0.0.9 with API (none)")])
def test_a_server_of_another_api_is_refused_before_any_upload(other_server, health, says, tmp_path, capsys):
    httpd, url = other_server
    httpd.health = health
    with pytest.raises(ServerError) as refused:
        RemoteSession(Client(url), b"image bytes", "image.nii.gz")
    message = str(refused.value)
    assert refused.value.code == "api_mismatch" and "\n" not in message
    assert says in message and f"this client ({__version__}) speaks API {API_VERSION}" in message
    assert "install the same sslmedsam2 version on both sides" in message
    assert httpd.other == [], "nothing was sent to the server"

    image, labels = synthetic_case(shape=(8, 24, 24))
    sitk.WriteImage(to_image(image), str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(to_image(seeds_on(labels, {1: [2, 5]}).astype(np.uint8)), str(tmp_path / "seeds.nii.gz"))
    out = tmp_path / "out.nii.gz"
    assert main(["propagate", str(tmp_path / "image.nii.gz"), str(tmp_path / "seeds.nii.gz"), "-o", str(out),
                 "--server", url]) != 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1 and says in lines[0] and not out.exists() and httpd.other == []


def test_the_real_server_says_its_api_version(engine_server):
    assert engine_server.compatible_health()["api"] == API_VERSION == engine_server.info()["api"]
