"""`sslmedsam2 serve`: check the settings (loopback unless there is a token), build the model, listen, serve until
SIGINT/SIGTERM, then delete every session's data."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sslmedsam2.errors import UserError
from sslmedsam2.remote.addresses import is_loopback
from sslmedsam2.server.limits import MB, ServerSettings, parse_gb
from sslmedsam2.settings import EditRule

DEFAULT_PORT = 8765


def check_bind(settings: ServerSettings) -> None:
    """Anything but a loopback address needs a token: a server holding patient images is not open to a network."""
    if not is_loopback(settings.host) and not settings.tokens:
        raise UserError(f"--host {settings.host}: listening beyond this machine (not 127.0.0.1) needs --token-file; "
                        "or keep 127.0.0.1 and reach the server through an SSH tunnel")


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, listening at once: the port is ours while the model is built (a bound socket that does
    not listen yet can be bound again by another program with SO_REUSEADDR on Linux); requests wait in its queue."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        if os.name == "nt":  # Windows' SO_REUSEADDR would let another socket take a port in use
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:  # a restart finds its port free although the last run's connections linger (TIME_WAIT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def settings_from(args: argparse.Namespace) -> ServerSettings:
    from sslmedsam2.remote.tokens import read_server_tokens

    if not math.isfinite(args.max_request_mb):  # before it becomes an int; the rest is ServerSettings.check()'s
        raise UserError(f"--max-request-mb {args.max_request_mb}: a finite number is needed")
    return ServerSettings(
        host=args.host, port=args.port, device=args.device, model=args.model, checkpoint=args.checkpoint,
        image_size=args.image_size, download=not args.no_download,
        memory_budget=None if args.memory_budget is None else parse_gb(args.memory_budget),
        max_sessions=args.max_sessions, max_sessions_per_token=args.max_sessions_per_token,
        idle_timeout_s=args.idle_timeout * 60.0,
        max_request_bytes=int(args.max_request_mb * MB), compile=args.compile,
        edit_rule=EditRule(slices=args.edit_window, dice=args.edit_agreement),
        tokens=read_server_tokens(args.token_file) if args.token_file else [])


def serve(settings: ServerSettings, say: Callable[[str], None], exit_with_stdin: bool = False) -> int:
    """Serve until SIGINT or SIGTERM (or, with exit_with_stdin, until standard input closes). HTTP runs on a thread;
    the jobs run on this (the main) thread, as the command line computes: torch's CPU kernels are markedly faster
    there than on another thread."""
    import uvicorn

    from sslmedsam2.server.app import create_app
    from sslmedsam2.server.connections import uvicorn_config
    from sslmedsam2.server.limits import human
    from sslmedsam2.server.service import Service
    from sslmedsam2.server.shutdown import Shutdown, stop_when_closed

    settings.check()
    check_bind(settings)
    sock = bind(settings.host, settings.port)  # before the model is built: a taken port fails at once
    service = Service(settings, say, worker_thread=False)
    server = thread = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True
        service.runner.stop()

    shutdown = Shutdown(stop, lambda: service.root, say)

    def on_signal(signum, frame) -> None:  # the work goes to a thread: nothing here may wait for a lock or write
        threading.Thread(target=shutdown.request, args=(signal.Signals(signum).name,), daemon=True).start()

    saved = {}
    failed: list[str] = []  # what ended the HTTP thread, if not a stop
    if exit_with_stdin:
        stop_when_closed(sys.stdin.buffer, shutdown)
    try:
        service.start()  # Ctrl-C here (a download, say) interrupts it at once
        # SIGHUP: the SSH session that started it ended (the README's GPU workflow); the data is deleted as well
        stops = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
        saved = {sig: signal.signal(sig, on_signal) for sig in stops}
        if hasattr(signal, "SIGUSR1"):  # `kill -USR1 <pid>`: every thread's stack on stderr (what is it doing?)
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        server = uvicorn.Server(uvicorn_config(create_app(service), settings, timeout_graceful_shutdown=5))

        def http() -> None:
            try:
                server.run(sockets=[sock])
            except BaseException as exc:  # reported on the main thread, in one line
                # uvicorn ends with SystemExit after logging its own line (above ours on stderr)
                failed.append("see the lines above" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}")
            finally:
                service.runner.stop()  # no HTTP, no work

        thread = threading.Thread(target=http, name="sslmedsam2-http", daemon=True)
        thread.start()
        while not server.started and thread.is_alive():  # "serving" is said once it serves
            time.sleep(0.02)
        if (failed or not server.started) and not shutdown.requested.is_set():  # not a stop asked for meanwhile
            raise UserError(f"cannot serve on {settings.host}:{settings.port}: "
                            f"{failed[0] if failed else 'the HTTP server stopped at its start'}")
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        access = "token required" if settings.tokens else "no token: this machine only"
        say(f"serving {service.model} on {service.device} at {url} ({access}; "
            f"memory budget {human(service.budget.limit)}, at most {settings.max_sessions} sessions "
            f"({settings.per_token_sessions} per token), idle sessions "
            f"closed after {settings.idle_timeout_s / 60:.0f} min); API: {url}/docs")
        if not shutdown.requested.is_set():  # a stop asked for while the model was built
            service.runner.run()
    finally:
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(15)
        service.close()
        sock.close()
        shutdown.done()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if failed:
        raise UserError(f"the HTTP server stopped: {failed[0]}; every session's data is deleted")
    say("stopped; every session's data is deleted")
    return 0


def add_serve_command(sub, add_model_options: Callable[[argparse.ArgumentParser], None]) -> None:
    s = sub.add_parser("serve", help="a long-lived SAM2 server for interactive propagation (local or on a GPU machine)",
                       description="Keep SAM2 models and each open volume's slice features in memory, so propagating "
                       "again after an edit runs only the tracking. HTTP+JSON API (see /docs). Listens on 127.0.0.1 "
                       "unless --host says otherwise, which needs --token-file.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "anything else needs --token-file)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    s.add_argument("--token-file", type=Path, help="file with one access token per line (mode 600); every request "
                   "must then send one, and sees only the sessions opened with it")
    s.add_argument("--memory-budget", metavar="GB", help="the most that cached slice features of all sessions may "
                   "take (default: half the free main memory plus 40%% of the GPU's free memory); the least recently "
                   "used volumes give theirs up first")
    s.add_argument("--max-sessions", type=int, default=8, help="open sessions at most (default 8)")
    s.add_argument("--max-sessions-per-token", type=int, metavar="N", help="open sessions one token may hold "
                   "(default: half of --max-sessions, at least 1, when the token file holds several tokens; else "
                   "--max-sessions)")
    s.add_argument("--idle-timeout", type=float, default=30.0, metavar="MINUTES",
                   help="close a session (and delete its data) after this long unused (default 30)")
    s.add_argument("--max-request-mb", type=float, default=1024.0, help="largest request (an image upload) in MB "
                   "(default 1024)")
    s.add_argument("--edit-window", type=int, metavar="SLICES", help="an edit's local re-tracking stops after this "
                   "many consecutive slices agree with the previous result (default: the model's memory window, 7 "
                   "for SAM2)")
    s.add_argument("--edit-agreement", type=float, default=0.99, metavar="DICE", help="the Dice of a slice's mask "
                   "with the previous result that counts as agreeing (default 0.99); 1 re-tracks until masks match "
                   "exactly")
    s.add_argument("--exit-with-stdin", action="store_true", help="also stop (and delete every session's data) when "
                   "standard input closes: for a program that starts the server and may end without stopping it")
    add_model_options(s)
    s.set_defaults(func=cmd_serve, model=None)


def cmd_serve(args: argparse.Namespace) -> int:
    def say(message: str) -> None:
        print(f"sslmedsam2: {message}", file=sys.stderr, flush=True)

    return serve(settings_from(args), say, exit_with_stdin=args.exit_with_stdin)


@contextlib.contextmanager
def serve_in_thread(settings: ServerSettings, say: Callable[[str], None] = lambda message: None):
    """A server on a background thread of this process (tests, notebooks); yields (url, service). Leaving the block
    stops it and deletes every session's data."""
    import uvicorn

    from sslmedsam2.server.app import create_app
    from sslmedsam2.server.connections import uvicorn_config
    from sslmedsam2.server.service import Service

    settings.check()
    check_bind(settings)
    sock = bind(settings.host, settings.port)
    service = Service(settings, say)
    try:
        service.start()
        server = uvicorn.Server(uvicorn_config(create_app(service), settings))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="sslmedsam2-http", daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread ended before it started serving")
            time.sleep(0.02)
        host, port = sock.getsockname()[:2]
        try:
            yield f"http://{host}:{port}", service
        finally:
            server.should_exit = True
            thread.join(15)
    finally:
        service.close()
        sock.close()
