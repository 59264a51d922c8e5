"""Runs one engine command (`python -m sslmedsam2 ...`, or the engine command's `sslmedsam2 ...`) in a QProcess:
Slicer stays responsive, output streams in.

The process is the real interpreter, not Slicer's PythonSlicer launcher (see launch.py), or the engine command
itself: Cancel reaches the engine.
"""

from __future__ import annotations

import os

import qt

from SSLMedSAM2Lib.engine_output import EngineOutput
from SSLMedSAM2Lib.launch import engine_program
from SSLMedSAM2Lib.signal import Signal


def streaming_process(environment: dict[str, str], on_output, on_finished, on_error) -> "qt.QProcess":
    """A QProcess not yet started, in exactly `environment`, stdout and stderr merged; its readyRead, finished and
    errorOccurred signals call the three slots."""
    process = qt.QProcess()
    process.setProcessChannelMode(qt.QProcess.MergedChannels)
    qt_environment = qt.QProcessEnvironment()
    for key, value in environment.items():
        qt_environment.insert(key, value)
    process.setProcessEnvironment(qt_environment)
    process.connect("readyRead()", on_output)
    process.connect("finished(int,QProcess::ExitStatus)", on_finished)
    process.connect("errorOccurred(QProcess::ProcessError)", on_error)
    return process

KILL_AFTER_MS = 5000


class EngineProcess:
    """progress(done, total), message(text) and finished(error or "") signals; cancel() stops it."""

    def __init__(self) -> None:
        self.progress = Signal(int, int)
        self.message = Signal(str)
        self.finished = Signal(str)
        self._process = None
        self._program = ""
        self._command = ""  # the engine command this run uses ("": Slicer's own Python)
        self._output = EngineOutput()
        self._cancelled = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.state() != qt.QProcess.NotRunning

    def start(self, arguments: list[str], command: str = "") -> None:
        """`sslmedsam2 ARGUMENTS` in Slicer's own Python, or with `command` (another environment's sslmedsam2)."""
        if self.running:
            raise RuntimeError("an engine command is already running")
        self._output, self._cancelled, self._command = EngineOutput(), False, command
        self._program, program_arguments, environment = engine_program(arguments, command)
        process = self._process = streaming_process(environment, self._on_output, self._on_finished, self._on_error)
        process.start(self._program, program_arguments)

    def cancel(self) -> None:
        """Stops the engine itself (its outputs are written atomically: nothing half-done is left).

        POSIX: SIGTERM, then a kill if it has not stopped after 5 s. Windows: a kill at once, since terminate()
        only posts WM_CLOSE, which a console process never reads.
        """
        if not self.running:
            return
        self._cancelled = True
        process = self._process  # not whatever runs 5 s from now
        if os.name == "nt":
            process.kill()
            return
        process.terminate()
        qt.QTimer.singleShot(KILL_AFTER_MS,
                             lambda: process.kill() if process.state() != qt.QProcess.NotRunning else None)

    def _on_output(self) -> None:
        data = self._process.readAll().data().decode("utf-8", errors="replace")
        update = self._output.feed(data)
        if update.progress:
            self.progress.emit(*update.progress)
        for line in update.messages or []:
            self.message.emit(line)

    def _on_error(self, error) -> None:
        if error == qt.QProcess.FailedToStart:
            self.finished.emit(f"could not start the engine command {self._program}" if self._command else
                               f"could not start {self._program} -m sslmedsam2 (are the dependencies installed?)")

    def _on_finished(self, exit_code: int, exit_status) -> None:
        self._on_output()
        if self._cancelled:
            self.finished.emit("cancelled")
        elif exit_status == qt.QProcess.CrashExit:
            self.finished.emit(self._output.error or "the engine crashed; see the log")
        elif exit_code != 0:
            self.finished.emit(self._output.error or f"the engine stopped with exit code {exit_code}; see the log")
        else:
            self.finished.emit("")
