"""The server under hostile or careless clients (on 127.0.0.1, with the random-weight SAM2): a client that leaves
without reading the answer to its upload leaves no session; connections that never finish their headers are closed;
one token cannot take every session; uploads are read a few at a time, within the memory budget; a stalled body is
dropped; the client never shows the user-info of its URL; the Bearer scheme is matched in any case."""

from __future__ import annotations

import select
import socket
import threading
import time

import pytest
import requests
import SimpleITK as sitk
from conftest import TINY_SIZE, synthetic_case, to_image

from sslmedsam2.cli import main
from sslmedsam2.errors import UserError
from sslmedsam2.remote.client import Client, ServerError, ServerUnreachable
from sslmedsam2.server.limits import MB, ServerSettings
from sslmedsam2.server.main import serve_in_thread

OPEN = {"model": "sam2.1-tiny", "image_size": TINY_SIZE}
QUERY = f"/sessions?name=a.nii&model=sam2.1-tiny&image_size={TINY_SIZE}"
ALICE, BOB = "alice-" + "a" * 30, "bob-" + "b" * 30


def _settings(checkpoint, tmp_path, **extra) -> ServerSettings:
    return ServerSettings(port=0, device="cpu", model="sam2.1-tiny", checkpoint=checkpoint, image_size=TINY_SIZE,
                          workdir=tmp_path, **extra)


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, tmp_path_factory):
    """A server with two tokens, four sessions (two per token by default) and a 1 s header deadline."""
    settings = _settings(tiny_checkpoint, tmp_path_factory.mktemp("guarded"), tokens=[ALICE, BOB], max_sessions=4,
                         header_timeout_s=1.0)
    with serve_in_thread(settings) as (url, service):
        yield url, service


def _nii(tmp_path, shape=(10, 64, 64)) -> bytes:
    """An uncompressed NIfTI file: its size is known (10 x 64 x 64 float32: 160 kB, past uvicorn's 64 kB buffer)."""
    image, _ = synthetic_case(shape=shape)
    path = tmp_path / "a.nii"
    sitk.WriteImage(to_image(image), str(path))
    return path.read_bytes()


def _connect(url: str) -> socket.socket:
    host, port = url.split("//")[1].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _head(method: str, path: str, length: int | None = None, token: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    lines += [f"Authorization: Bearer {token}"] if token else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def _closed_by_server(sock: socket.socket, seconds: float) -> bool:
    """Whether the server ends the connection within `seconds` (whatever answer it sends first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset: ended too
        return True


def _refused(answer: requests.Response, status: int, fragment: str) -> None:
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "code"} and "\n" not in body["error"] and fragment in body["error"], body


def test_a_client_that_leaves_without_reading_the_answer_leaves_no_session(tiny_checkpoint, tmp_path, monkeypatch):
    data = _nii(tmp_path)
    with serve_in_thread(_settings(tiny_checkpoint, tmp_path)) as (url, service):
        # it leaves once the answer has arrived, unread (its socket closes with data in it: a reset)
        for attempt in range(4):
            sock = _connect(url)
            sock.sendall(_head("POST", QUERY, len(data)) + data)
            assert select.select([sock], [], [], 30)[0], "the server answers"
            sock.close()
            assert _until(lambda: not service.info("local")["sessions"], 5), f"try {attempt}: the session stays open"

        # it leaves while the volume is read: the session is closed once opened
        opening, reading, opened = service.open_session, threading.Event(), threading.Event()

        def slow(*args, **kwargs):
            reading.set()
            answer = opening(*args, **kwargs)
            opened.set()
            time.sleep(1.0)
            return answer

        monkeypatch.setattr(service, "open_session", slow)
        for attempt in range(2):
            reading.clear()
            opened.clear()
            sock = _connect(url)
            sock.sendall(_head("POST", QUERY, len(data)) + data)
            assert reading.wait(30)
            sock.close()
            assert opened.wait(30)
            assert _until(lambda: not service.info("local")["sessions"], 5), f"try {attempt}: the session stays open"
        monkeypatch.undo()

        # a client that reads its answer keeps its session
        kept = requests.post(url + "/sessions", params={"name": "a.nii", **OPEN}, data=data, timeout=60)
        assert kept.status_code == 201 and service.info("local")["sessions"] == 1
        assert list(p.name for p in service.root.iterdir()) == [kept.json()["session"]]


def test_connections_that_never_finish_their_headers_are_closed(guarded):
    url, _ = guarded
    held = [_connect(url) for _ in range(40)]
    for i, sock in enumerate(held):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else b"")
    trickling = _connect(url)
    trickling.sendall(b"GET /health HTTP/1.1\r\n")
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # a byte every 0.2 s: each would reset a plain idle timer
        try:
            trickling.send(b"X")
        except OSError:
            break
        time.sleep(0.2)
    assert _closed_by_server(trickling, 0.5), "headers sent a byte at a time are held past the deadline"
    assert all(_closed_by_server(sock, 0.5) for sock in held), "connections without headers are held"

    # after an answer, the next request's headers are due as well
    kept = _connect(url)
    kept.sendall(_head("GET", "/health", token=ALICE))
    assert b" 200 " in kept.recv(65536)
    kept.sendall(b"GET /health HTTP/1.1\r\n")
    assert _closed_by_server(kept, 3.0)

    # an unauthenticated body that never comes: answered 401 and closed, not held
    silent = _connect(url)
    silent.sendall(_head("POST", QUERY, 1000000))
    assert _closed_by_server(silent, 3.0)
    assert requests.get(url + "/health", headers={"Authorization": f"Bearer {ALICE}"}, timeout=10).ok


def test_one_token_cannot_take_every_session(guarded, tiny_checkpoint, tmp_path, capsys):
    url, service = guarded
    data = _nii(tmp_path, (6, 16, 16))
    assert service.settings.per_token_sessions == 2, "default: half of --max-sessions with several tokens"
    assert _settings(tiny_checkpoint, tmp_path, tokens=[ALICE], max_sessions=4).per_token_sessions == 4
    alice, bob = Client(url, token=ALICE), Client(url, token=BOB)
    try:
        for _ in range(2):
            alice.open_session(data, "a.nii", **OPEN)
        with pytest.raises(ServerError, match=r"^your token holds 2 open sessions, its limit \(serve "
                                              r"--max-sessions-per-token\)") as refused:
            alice.open_session(data, "a.nii", **OPEN)
        assert refused.value.status == 409 and refused.value.code == "conflict"
        answer = requests.post(url + "/sessions", params={"name": "a.nii", **OPEN}, data=data, timeout=60,
                               headers={"Authorization": f"Bearer {ALICE}"})
        _refused(answer, 409, "your token holds 2 open sessions")
        for _ in range(2):
            bob.open_session(data, "a.nii", **OPEN)
        with pytest.raises(ServerError, match="the server holds 4 open sessions, its limit"):
            bob.open_session(data, "a.nii", **OPEN)
        assert alice.info()["limits"]["max_sessions_per_token"] == 2
    finally:
        for client in (alice, bob):
            for session in client.get_json("/sessions"):
                client.close_session(session["session"])
            client.close()

    with pytest.raises(UserError, match="--max-sessions-per-token must be between 1 and --max-sessions"):
        _settings(tiny_checkpoint, tmp_path, max_sessions=4, max_sessions_per_token=0).check()
    assert main(["serve", "--port", "0", "--max-sessions", "2", "--max-sessions-per-token", "3"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "sslmedsam2: error: --max-sessions-per-token must be between 1 and --max-sessions (2)")


def test_uploads_are_read_a_few_at_a_time_within_the_memory_budget(tiny_checkpoint, tmp_path):
    settings = _settings(tiny_checkpoint, tmp_path, memory_budget=8 * MB, max_uploads=2, upload_wait_s=0.5,
                         body_timeout_s=4.0)
    with serve_in_thread(settings) as (url, service):
        def uploads_bytes() -> int:
            return service.info("local")["memory"]["uploads_bytes"]

        first = _connect(url)  # declares 6 MB, sends 1.5 MB, stalls: it counts 6 MB while it is read
        first.sendall(_head("POST", QUERY, 6 * MB) + bytes(3 * MB // 2))
        assert _until(lambda: uploads_bytes() == 6 * MB, 5)
        post = lambda size: requests.post(url + "/sessions", params={"name": "a.nii", **OPEN},  # noqa: E731
                                          data=bytes(size), timeout=30)
        _refused(post(3 * MB), 507, "memory budget (8 MB) is taken by other uploads")
        _refused(post(9 * MB), 413, "larger than the server's memory budget")
        second = _connect(url)  # the second turn: 6 + 1.5 MB fit in 8
        second.sendall(_head("POST", QUERY, 3 * MB // 2) + bytes(MB // 2))
        assert _until(lambda: uploads_bytes() == 6 * MB + 3 * MB // 2, 5)
        _refused(post(2 * MB), 409, "reading 2 uploads at once, its limit")
        assert post(MB // 2).status_code == 400, "a small body does not wait for a turn"

        # stalled bodies are dropped (408) and give their turn and bytes back
        for sock in (first, second):
            sock.settimeout(10)
            assert sock.recv(65536).startswith(b"HTTP/1.1 408 ")
        assert _until(lambda: uploads_bytes() == 0, 5)
        volume = _nii(tmp_path, (20, 128, 128))  # 1.3 MB: an upload, read in its turn
        assert len(volume) > MB
        opened = requests.post(url + "/sessions", params={"name": "a.nii", **OPEN}, data=volume, timeout=60)
        assert opened.status_code == 201, opened.text
        assert _until(lambda: uploads_bytes() == 0, 5)


def test_the_client_never_shows_the_user_info_of_its_url(guarded):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with pytest.raises(ServerUnreachable) as unreachable:
        Client(f"http://alice:pa55word@127.0.0.1:{port}").health()
    assert "pa55word" not in str(unreachable.value) and f"http://***@127.0.0.1:{port}" in str(unreachable.value)
    with pytest.raises(UserError) as malformed:
        Client(f"http://{ALICE}@127.0.0.1:x")
    assert ALICE not in str(malformed.value)
    client = Client(guarded[0].replace("//", f"//{ALICE}@"))  # sent as Basic credentials: refused
    assert ALICE not in client.url
    with pytest.raises(ServerError, match="refused the request") as refused:
        client.info()
    assert ALICE not in str(refused.value) and "http://***@127.0.0.1:" in str(refused.value)


def test_the_bearer_scheme_is_matched_in_any_case(guarded):
    """RFC 7235: the scheme is case-insensitive; a wrong scheme (or none) is refused."""
    def status(authorization: str) -> int:
        return requests.get(guarded[0] + "/health", headers={"Authorization": authorization}, timeout=10).status_code

    for scheme in ("Bearer", "bearer", "bEaReR", "BEARER"):
        assert status(f"{scheme} {ALICE}") == 200, scheme
    for wrong in (f"Basic {ALICE}", f"Token {ALICE}", f"Bearerx {ALICE}", ALICE, "Bearer", f"Bearer {ALICE}x"):
        assert status(wrong) == 401, wrong
