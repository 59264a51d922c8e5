"""In front of every request (the OpenAPI page too): the token, the body's size, an upload's turn and its bytes in
the memory budget, a stalled body's timeout; then the request goes on with its whole body, and the routes can tell
whether the client is still there.

Every refusal here is a JSON answer {"error": one line, "code": ...} that closes the connection (its body may not
have been read to its end)."""

from __future__ import annotations

import asyncio
import io
import json

from starlette.concurrency import run_in_threadpool

from sslmedsam2.server.errors import Conflict, ServiceError, Timeout, TooLarge, Unauthorized
from sslmedsam2.server.limits import SMALL_BODY
from sslmedsam2.remote.tokens import TokenCheck
from sslmedsam2.remote.wire import INSTANCE_HEADER

UNAUTHORIZED_DRAIN = 1 << 20  # a refused request's body read and dropped, at most, so that the client gets the 401
_NO_TOKEN = Unauthorized("missing or wrong token: send the header 'Authorization: Bearer <token>' with a token from "
                         "the server's token file")


def error_body(message: str, code: str) -> bytes:
    return json.dumps({"error": message, "code": code}).encode()


def bearer_token(authorization: bytes) -> str | None:
    """The token of an 'Authorization: Bearer <token>' header; the scheme is matched case-insensitively (RFC 7235)."""
    scheme, _, presented = authorization.decode("latin-1").strip().partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else None


class Gate:
    """The token, then the body: read here, whole, up to the limit, so that no route ever sees more. A body over
    SMALL_BODY is an upload: it waits for one of `max_uploads` turns (up to `upload_wait_s`; then 409) and its bytes
    count against the memory budget (413 larger than the budget, 507 no room beside the uploads in flight) until the
    route has answered. A body silent for `body_timeout_s` is dropped (408). A refused body is read and dropped up
    to a bound, so that the client gets the answer rather than a broken connection."""

    def __init__(self, app, service, tokens: TokenCheck) -> None:
        self.app, self.service, self.tokens = app, service, tokens
        self.settings = service.settings
        self.instance = service.instance.encode()
        self._turns: asyncio.Semaphore | None = None  # made on the server's event loop

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_tagged(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (INSTANCE_HEADER.lower().encode(), self.instance)]
            await send(message)

        headers = dict(scope["headers"])
        owner = self.tokens.owner(bearer_token(headers.get(b"authorization", b"")))
        if owner is None:
            timeout = self.settings.header_timeout_s  # nobody known: held no longer than a request's headers
            await self._drain(receive, UNAUTHORIZED_DRAIN, timeout, timeout)
            await self._refuse(send_tagged, _NO_TOKEN)
            return
        declared = headers.get(b"content-length")
        declared = int(declared) if declared is not None and declared.isdigit() else None
        upload = _Upload(self)
        try:
            try:
                body = await self._read(receive, declared, upload)
            except ServiceError as refused:
                upload.release()  # not held while the rest is dropped
                if not isinstance(refused, Timeout):
                    await self._drain(receive, 4 * self.settings.max_request_bytes, self.settings.body_timeout_s)
                await self._refuse(send_tagged, refused)
                return
            if body is None:  # the client left
                return
            gone = asyncio.Event()
            watcher = asyncio.create_task(self._watch(receive, gone))
            try:
                scope.setdefault("state", {})["owner"] = owner
                await self.app(scope, _replay(body, gone), send_tagged)
            finally:
                watcher.cancel()
        finally:
            upload.release()

    async def _read(self, receive, declared: int | None, upload: _Upload) -> bytes | None:
        """The whole body (None if the client left), taking an upload's turn and budget first where it is large."""
        limit = self.settings.max_request_bytes
        if declared is not None and declared > limit:
            raise self._too_large()
        if declared is not None and declared > SMALL_BODY:
            await upload.hold(declared)
        buffer = io.BytesIO()  # its getvalue() hands the bytes over without a copy
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.settings.body_timeout_s)
            except TimeoutError:
                raise Timeout(f"the request's body stalled (nothing arrived for {self.settings.body_timeout_s:.0f} "
                              "s); send it again") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size = buffer.tell() + len(chunk)
            if size > limit:
                raise self._too_large()
            if size > upload.held and size > SMALL_BODY:  # a body of undeclared length: reserve as it grows
                await upload.hold(min(limit, max(size, 2 * upload.held)))
            buffer.write(chunk)
            if not message.get("more_body", False):
                return buffer.getvalue()

    @staticmethod
    async def _watch(receive, gone: asyncio.Event) -> None:
        """After the body, the server's next message is the client's departure (or the end of our answer): reading
        goes on meanwhile, so that a client that leaves while its request is worked on is seen at once."""
        if (await receive())["type"] == "http.disconnect":
            gone.set()

    def turns(self) -> asyncio.Semaphore:
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.settings.max_uploads)
        return self._turns

    def _too_large(self) -> TooLarge:
        return TooLarge(f"request larger than this server's limit of {self.settings.max_request_bytes >> 20} MB "
                        "(serve --max-request-mb)")

    @staticmethod
    async def _drain(receive, budget: int, idle: float, total: float | None = None) -> None:
        """Read and drop what the client still sends: up to `budget` bytes, until it is silent for `idle` s, for
        `total` s at most."""
        async def drain() -> None:
            nonlocal budget
            while budget > 0:
                message = await asyncio.wait_for(receive(), idle)
                if message["type"] != "http.request":
                    return
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return

        try:
            await asyncio.wait_for(drain(), total)
        except TimeoutError:
            pass

    @staticmethod
    async def _refuse(send, refused: ServiceError) -> None:
        body = error_body(str(refused), refused.code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        if refused.status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": refused.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Upload:
    """An upload's turn among those read at once and its bytes reserved in the memory budget, both given back by
    release() (at once, without waiting: it runs when the request ends, even cancelled)."""

    def __init__(self, gate: Gate) -> None:
        self.gate, self.held, self.turn = gate, 0, False

    async def hold(self, size: int) -> None:
        """Hold `size` bytes in all (a turn first): 409 no turn within upload_wait_s, 413/507 no room in the budget."""
        settings = self.gate.settings
        if not self.turn:
            try:
                await asyncio.wait_for(self.gate.turns().acquire(), settings.upload_wait_s)
            except TimeoutError:
                raise Conflict(f"the server is reading {settings.max_uploads} uploads at once, its limit, and none "
                               f"ended within {settings.upload_wait_s:.0f} s; send this one again later") from None
            self.turn = True
        if size > self.held:
            self.gate.service.reserve_upload(self.held, size)  # here, not on a thread: a cancel cannot lose it
            self.held = size
            await run_in_threadpool(self.gate.service.make_room)  # least recently used features out

    def release(self) -> None:
        if self.held:
            self.gate.service.release_upload(self.held)
            self.held = 0
        if self.turn:
            self.gate.turns().release()
            self.turn = False


def _replay(body: bytes, gone: asyncio.Event):
    """The app's `receive`: the whole body once, then (as ASGI says) a wait for the client's departure."""
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return receive
