"""The HTTP connections of `serve`: uvicorn on its h11 protocol, with a deadline for each request's headers.

uvicorn (0.55) has no header timeout: its only connection timer, `timeout_keep_alive`, is armed once an answer has
been sent and is cancelled by any byte received, so a client that connects and never finishes its headers (or
sends one byte every few seconds) holds its connection, and a file descriptor, forever, before any token is seen;
`limit_concurrency` would not help (it answers 503 to every request, real ones too, while such connections are
open). `HeaderDeadline` adds the missing timer: from the connection's start, and again from the end of each answer,
the next request's headers must be complete within `header_timeout` seconds, however they trickle in; else the
connection is closed. The rest is uvicorn's own settings: the keep-alive timeout, h11's limit on the headers' size
(larger: 400), and no WebSocket protocol (the API has none).

A request may also leave a callable in scope["state"][UNREAD_ANSWER]: it runs (on a thread) if the connection ends
before its answer is sent, or is reset by the client before its next request (a client that closes its socket with
data unread resets it: TCP), i.e. when the client left without reading the answer."""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from sslmedsam2.server.limits import ServerSettings

UNREAD_ANSWER = "sslmedsam2.unread_answer"  # scope["state"] key: what to call if the client drops the answer unread
KEEP_ALIVE_S = 5  # an idle connection is closed this long after its last answer (uvicorn's default)
HEADER_LIMIT = 16 * 1024  # bytes of a request line and headers (h11's default); more answers 400


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol; a request's headers must arrive within `header_timeout` s of the connection's start or
    of the previous answer's end."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_after = None  # the request cycle the deadline follows (None: the connection's start)
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._waiting_after = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.cycle is self._waiting_after and not self.transport.is_closing():  # no new request's headers yet
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._deadline is not None and self.cycle is not self._waiting_after:  # a request's headers arrived
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before uvicorn handles a pipelined request, which then disarms it
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        # the last request's answer was not all sent, or the client reset the connection (closed it unread)
        if self.cycle is not None and (not self.cycle.response_complete or isinstance(exc, ConnectionError)):
            hook = self.scope.get("state", {}).pop(UNREAD_ANSWER, None)
            if hook is not None:
                self.loop.run_in_executor(None, hook)
        super().connection_lost(exc)


def uvicorn_config(app, settings: ServerSettings, **extra) -> uvicorn.Config:
    """uvicorn's configuration for `serve` (and its in-process variant): h11 with the header deadline of `settings`
    whichever HTTP parser is installed, so that every limit here applies."""
    protocol = type("SSLMedSAM2Connection", (HeaderDeadline,), {"header_timeout": settings.header_timeout_s})
    return uvicorn.Config(app, http=protocol, ws="none", timeout_keep_alive=KEEP_ALIVE_S,
                          h11_max_incomplete_event_size=HEADER_LIMIT, log_level="warning", access_log=False, **extra)
