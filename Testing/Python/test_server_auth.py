"""Who may talk to the server: loopback only without a token; with one, every request (the API page too) needs a
valid token, and a session is visible only to the token that opened it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from conftest import TINY_SIZE, synthetic_case, to_image

from sslmedsam2.cli import main
from sslmedsam2.errors import UserError
from sslmedsam2.remote.client import Client, ServerError, SessionGone
from sslmedsam2.server.limits import ServerSettings
from sslmedsam2.remote.addresses import is_loopback
from sslmedsam2.server.main import check_bind, serve_in_thread
from sslmedsam2.remote.tokens import TokenCheck, read_client_token, read_server_tokens
from sslmedsam2.session.remote import RemoteSession

ALICE, BOB = "alice-" + "a" * 30, "bob-" + "b" * 30


def _token_file(path, *tokens, mode=0o600):
    path.write_text("# one token per person\n" + "\n".join(tokens) + "\n")
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.7", False), ("example.org", False)])
def test_only_loopback_without_a_token(host, loopback):
    assert is_loopback(host) == loopback
    if loopback:
        check_bind(ServerSettings(host=host))
    else:
        with pytest.raises(UserError, match="needs --token-file"):
            check_bind(ServerSettings(host=host))
        check_bind(ServerSettings(host=host, tokens=[ALICE]))


def test_serve_on_a_network_address_without_a_token_is_refused_at_once(capsys):
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --token-file" in err[0] and "SSH tunnel" in err[0]


@pytest.mark.parametrize("option, value", [("--idle-timeout", "nan"), ("--idle-timeout", "inf"),
                                           ("--max-request-mb", "inf"), ("--memory-budget", "inf"),
                                           ("--memory-budget", "nan")])
def test_serve_refuses_numbers_that_are_not_finite(option, value, capsys):
    """nan would keep every session forever (no idle expiry); inf overflowed into a traceback."""
    assert main(["serve", "--port", "0", option, value]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sslmedsam2: error: {option}"), err


def test_the_port_is_held_from_the_start_not_only_once_serving():
    """While the model is built, no other program may take the port (Linux lets a second SO_REUSEADDR socket bind
    a port whose first socket does not listen yet)."""
    import socket

    from sslmedsam2.server.main import bind

    held = bind("127.0.0.1", 0)
    rival = socket.socket()
    rival.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with pytest.raises(OSError):
        rival.bind(held.getsockname())
    rival.close()
    held.close()


def test_token_files(tmp_path):
    good = _token_file(tmp_path / "tokens", ALICE, BOB)
    assert read_server_tokens(good) == [ALICE, BOB]
    assert read_client_token(good) == ALICE
    with pytest.raises(UserError, match="chmod 600"):
        read_server_tokens(_token_file(tmp_path / "open", ALICE, mode=0o644))
    with pytest.raises(UserError, match="at least 16"):
        read_server_tokens(_token_file(tmp_path / "short", "secret"))
    with pytest.raises(UserError, match="no token"):
        read_server_tokens(_token_file(tmp_path / "empty"))
    with pytest.raises(UserError, match="twice"):
        read_server_tokens(_token_file(tmp_path / "twice", ALICE, ALICE))
    with pytest.raises(UserError, match="no such file"):
        read_client_token(tmp_path / "missing")
    bom = tmp_path / "bom"  # saved by a Windows editor: a byte-order mark, CRLF line ends
    bom.write_bytes(b"\xef\xbb\xbf# alice\r\n" + ALICE.encode() + b"\r\n")
    bom.chmod(0o600)
    assert read_server_tokens(bom) == [ALICE] and read_client_token(bom) == ALICE
    with pytest.raises(UserError, match="ASCII"):  # it could not travel in an HTTP header
        accents = tmp_path / "accents"
        accents.write_bytes("jeton-très-secret-à-moi\n".encode())  # UTF-8 whatever the machine's locale
        accents.chmod(0o600)
        read_client_token(accents)
    check = TokenCheck([ALICE, BOB])
    assert check.owner(ALICE) and check.owner(BOB) and check.owner(ALICE) != check.owner(BOB)
    assert check.owner(None) is None and check.owner(ALICE[:-1]) is None and check.owner(ALICE + "x") is None
    assert TokenCheck([]).owner(None) == "local"


def test_every_request_needs_a_token_and_sessions_are_private(tiny_checkpoint, tmp_path):
    tokens = _token_file(tmp_path / "tokens", ALICE, BOB)
    settings = ServerSettings(port=0, device="cpu", model="sam2.1-tiny", checkpoint=tiny_checkpoint,
                              image_size=TINY_SIZE, workdir=tmp_path, tokens=read_server_tokens(tokens))
    image, labels = synthetic_case(shape=(8, 24, 24))
    path = tmp_path / "image.nii.gz"
    sitk.WriteImage(to_image(image), str(path))
    with serve_in_thread(settings) as (url, service):
        for route in ("/health", "/info", "/sessions", "/docs", "/openapi.json"):
            for headers in ({}, {"Authorization": f"Bearer {ALICE[:-1]}"}, {"Authorization": ALICE}):
                answer = requests.get(url + route, headers=headers, timeout=30)
                assert answer.status_code == 401, (route, headers)
                assert "token" in answer.json()["error"] and answer.headers["WWW-Authenticate"] == "Bearer"
        answer = requests.post(url + "/sessions", data=path.read_bytes(), timeout=30)
        assert answer.status_code == 401, "an upload without a token is refused"
        with pytest.raises(ServerError, match="refused the request: missing or wrong token") as refused:
            Client(url, token="x" * 20).info()
        assert refused.value.status == 401

        alice = Client(url, token_file=tokens)
        bob = Client(url, token=BOB)
        assert requests.get(url + "/openapi.json", headers={"Authorization": f"Bearer {BOB}"}, timeout=30).ok
        volume = RemoteSession(alice, path.read_bytes(), path.name, model="sam2.1-tiny", image_size=TINY_SIZE)
        plane = np.where(labels[4] == 1, 1, 0).astype(np.uint8)
        job = alice.propagate(volume.id, {4: plane})
        assert [s["session"] for s in alice.get_json("/sessions")] == [volume.id]
        assert bob.get_json("/sessions") == [] and bob.info()["your_sessions"] == 0
        for attempt in (lambda: bob.session(volume.id), lambda: bob.labels(volume.id),
                        lambda: bob.propagate(volume.id, {4: plane}), lambda: bob.close_session(volume.id)):
            with pytest.raises(ServerError) as hidden:
                attempt()
            assert hidden.value.status == 404
        with pytest.raises(ServerError, match="no job") as hidden:
            bob.job(job["job"])
        assert alice.wait(job["job"])["state"] == "done"
        assert alice.labels(volume.id)[0].shape == (8, 24, 24)
        volume.close()
        with pytest.raises(SessionGone):
            alice.session(volume.id)
        alice.close()
        bob.close()


def test_the_client_needs_neither_torch_nor_fastapi():
    """3D Slicer and cluster jobs import the client alone: requests and numpy, nothing heavy."""
    import subprocess
    import sys

    code = ("import sys; import sslmedsam2.remote.client, sslmedsam2.remote.wire, sslmedsam2.remote.tokens; "
            "print(sorted(m for m in ('torch', 'fastapi', 'uvicorn', 'SimpleITK', 'sam2') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
