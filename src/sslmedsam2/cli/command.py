"""`sslmedsam2 COMMAND`: the parser of every command and how a run ends: every failure a user can fix is one line
and exit code 1, Ctrl-C, SIGTERM and SIGHUP clean up, geometry warnings are one line."""

from __future__ import annotations

import argparse
import signal
import threading
import warnings

from sslmedsam2 import __version__
from sslmedsam2.cli.options import add_model_options, say
from sslmedsam2.jobs import failure_line, out_of_memory
from sslmedsam2.volume.geometry import GeometryWarning


def build_parser() -> argparse.ArgumentParser:
    from sslmedsam2.cli.cohort import add_cohort_command
    from sslmedsam2.cli.segment import add_segment_commands
    from sslmedsam2.cli.study import add_study_commands
    from sslmedsam2.server.main import add_serve_command

    parser = argparse.ArgumentParser(prog="sslmedsam2", description="Draw a few slices, get the whole 3D "
                                     "segmentation: SAM2 propagation through medical volumes.")
    parser.add_argument("--version", action="version", version=f"sslmedsam2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_segment_commands(sub)
    add_study_commands(sub)
    add_cohort_command(sub)
    add_serve_command(sub, add_model_options)
    return parser


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwound like Ctrl-C, so that every temporary file is removed on the way out."""


def _stop(signum: int, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP clean up as SIGINT does (a signal the parent ignores, nohup's SIGHUP, stays ignored);
    commands with a stop of their own (refine, serve) install theirs over these."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            signal.signal(number, _stop)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, GeometryWarning):
        say(f"warning: {message}")
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stop_on_signals()
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", GeometryWarning)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        how = f"stopped by {exc.args[0]}" if isinstance(exc, Stopped) and exc.args else "interrupted"
        say(f"{how}; no output was written")
        return 130
    except OSError as exc:  # a read-only folder, a full disk: the environment, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        say(f"error: {where}{exc.strerror or exc}")
        return 1
    except Exception as exc:
        line = failure_line(exc)
        if line is None:  # a bug: its traceback
            raise
        say(f"error: {line}" + ("; no output was written" if out_of_memory(exc) else ""))
        return 1
