"""Runs an install plan's steps one after another, each `python -m pip ...` (or light_the_torch) in a QProcess, so
that Slicer stays responsive: pip's lines reach the panel as they come, and a failure keeps pip's output.

In Slicer 5.10 `slicer.util.pip_install` blocks the main thread until pip ends (its logProcessOutput processes
events on every line, so a second click can start a second pip meanwhile); this runs the same command, the real
interpreter's `-m pip` in Slicer's environment (launch.py), without waiting for it. The constraints file is written
again before every step from the packages installed by then (a torch installed by the step before is pinned too).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable
from pathlib import Path

import qt

from SSLMedSAM2Lib.dependencies import CONSTRAINTS, InstallStep
from SSLMedSAM2Lib.engine_process import streaming_process
from SSLMedSAM2Lib.launch import python_interpreter
from SSLMedSAM2Lib.signal import Signal

OUTPUT_CHARS = 400_000  # the output kept for the failure dialog (its end)


def step_command(program: str, step: InstallStep, constraints_path: str) -> list[str]:
    """The process's command line: `program -m module arguments...`, the constraints path filled in."""
    return [program, "-m", step.module, *(constraints_path if a == CONSTRAINTS else a for a in step.arguments)]


def step_environment(step: InstallStep, base: dict[str, str] | None = None) -> dict[str, str]:
    """Slicer's environment (the real interpreter needs its PYTHONHOME and library paths), unbuffered, never
    prompting, plus the step's own variables (SAM2_BUILD_CUDA=0 for sam2's build)."""
    environment = dict(os.environ if base is None else base)
    environment.update({"PYTHONUNBUFFERED": "1", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    environment.update(dict(step.environment))
    return environment


class InstallRunner:
    """line(text) for every output line, step(index, count, title) when a step starts, finished(error, output) at
    the end ("" on success). One run at a time."""

    def __init__(self, program: Callable[[], str] = python_interpreter) -> None:
        self.line = Signal(str)
        self.step = Signal(int, int, str)
        self.finished = Signal(str, str)
        self._program = program
        self._process = None
        self._steps: list[InstallStep] = []
        self._index = 0
        self._constraints: Callable[[], str] = lambda: ""
        self._folder = Path()
        self._output: list[str] = []
        self._pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._last_error = ""

    @property
    def running(self) -> bool:
        return bool(self._steps) and self._index < len(self._steps)

    def start(self, steps: list[InstallStep], constraints: Callable[[], str], folder: Path) -> None:
        """Run the steps in order; `constraints()` gives the constraints file's text before each step; the file
        goes into `folder` (the caller deletes it)."""
        if self.running:
            raise RuntimeError("an installation is already running")
        if not steps:
            raise ValueError("nothing to install")
        self._steps, self._index, self._constraints, self._folder = list(steps), 0, constraints, Path(folder)
        self._output, self._last_error = [], ""
        self._start_step()

    def _start_step(self) -> None:
        step = self._steps[self._index]
        self._pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        path = self._folder / "constraints.txt"
        path.write_text(self._constraints(), encoding="utf-8")
        command = step_command(self._program(), step, str(path))
        self.step.emit(self._index + 1, len(self._steps), step.title)
        self._say(f"$ {' '.join(command)}")
        process = self._process = streaming_process(step_environment(step), self._on_output, self._on_finished,
                                                    self._on_error)
        process.start(command[0], command[1:])

    def _say(self, text: str) -> None:
        self._output.append(text)
        if text.startswith("ERROR") or text.lower().startswith("error:"):
            self._last_error = text
        self.line.emit(text)

    def _on_output(self) -> None:
        data = self._decoder.decode(self._process.readAll().data())
        lines = (self._pending + data).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._pending = lines.pop()
        for text in lines:
            if text.strip():
                self._say(text.rstrip())

    def _flush(self) -> None:
        self._on_output()
        if self._pending.strip():
            self._say(self._pending.rstrip())
        self._pending = ""

    def _on_error(self, error) -> None:
        if error == qt.QProcess.FailedToStart:
            self._end(f"could not start {self._program()} (Slicer's Python) for step {self._index + 1}")

    def _on_finished(self, exit_code: int, exit_status) -> None:
        if not self.running:
            return
        self._flush()
        if exit_status == qt.QProcess.CrashExit or exit_code != 0:
            step = self._steps[self._index]
            why = self._last_error or (self._output[-1] if self._output else "no output")
            self._end(f"step {self._index + 1} of {len(self._steps)} ({step.title}) failed with exit code "
                      f"{exit_code}: {why}")
            return
        self._index += 1
        if self._index < len(self._steps):
            self._start_step()
        else:
            self._end("")

    def _end(self, error: str) -> None:
        self._index = len(self._steps)
        output = "\n".join(self._output)[-OUTPUT_CHARS:]
        self.finished.emit(error, output)
