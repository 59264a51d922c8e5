"""Cancel reaches the engine: the module starts the real interpreter, not Slicer's PythonSlicer launcher (a CTK
AppLauncher that runs it as a child and forwards no signal). EngineProcess runs here on PySide6's QtCore in place
of Slicer's PythonQt `qt`, beside a fake Slicer bin folder whose launcher behaves like CTK's. With an engine command
the jobs run as that program instead, outside Slicer's Python settings."""

from __future__ import annotations

import importlib
import os
import stat
import sys
import time
import types
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "SSLMedSAM2"
sys.path.insert(0, str(MODULE_DIR))

from SSLMedSAM2Lib.launch import background_options, engine_command, python_interpreter  # noqa: E402

from sslmedsam2.cli import main  # noqa: E402

LAUNCHER = """#!{python}
# Like CTK's AppLauncher: runs the real interpreter as a child, waits, forwards no signal.
import subprocess, sys
from pathlib import Path
sys.exit(subprocess.call([str(Path(__file__).with_name("python-real")), *sys.argv[1:]]))
"""
REAL = """#!/bin/sh
echo $$ > "$SSLMEDSAM2_TEST_PIDFILE"
exec "{python}" "$@"
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def slicer_bin(tmp_path) -> Path:
    """bin/PythonSlicer (the launcher) and bin/python-real (records the engine's pid, then is the interpreter)."""
    folder = tmp_path / "Slicer" / "bin"
    folder.mkdir(parents=True)
    _executable(folder / "python-real", REAL.format(python=sys.executable))
    return _executable(folder / "PythonSlicer", LAUNCHER.format(python=sys.executable))


def test_the_real_interpreter_replaces_the_launcher(tmp_path, slicer_bin):
    assert python_interpreter(str(slicer_bin)) == str(slicer_bin.with_name("python-real"))
    program, arguments = engine_command(["propagate", "a", "b"], str(slicer_bin))
    assert program == str(slicer_bin.with_name("python-real")) and arguments[:2] == ["-m", "sslmedsam2"]
    assert python_interpreter(sys.executable) == sys.executable  # not a launcher: as is
    build_tree = tmp_path / "python-install" / "bin"  # Slicer's build tree: PythonSlicer beside python
    build_tree.mkdir(parents=True)
    (build_tree / "python.exe").write_text("")
    assert python_interpreter(str(build_tree / "PythonSlicer.exe")) == str(build_tree / "python.exe")
    assert python_interpreter(str(tmp_path / "PythonSlicer")) == str(tmp_path / "PythonSlicer")  # unknown layout


def test_the_refine_job_starts_hidden_and_detached(monkeypatch):
    """POSIX: a session of its own. Windows ignores that, and a console window would open whose closing kills the
    job: no window (CREATE_NO_WINDOW, SW_HIDE as launchConsoleProcess), a process group of its own."""
    import subprocess

    assert background_options(windows=False) == {"start_new_session": True}

    class StartupInfo:  # subprocess.STARTUPINFO exists on Windows only
        def __init__(self) -> None:
            self.dwFlags, self.wShowWindow = 0, 1

    if not hasattr(subprocess, "STARTUPINFO"):
        monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    options = background_options(windows=True)
    assert "start_new_session" not in options
    assert options["creationflags"] & 0x08000000 and options["creationflags"] & 0x00000200  # no window, own group
    assert options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0  # hidden


def _qt_shim():
    """The few PythonQt `qt` names EngineProcess uses, on PySide6 (PythonQt connects by signature string)."""
    from PySide6 import QtCore

    class QProcess(QtCore.QProcess):
        def connect(self, signature: str, slot) -> bool:
            return QtCore.QObject.connect(self, QtCore.SIGNAL(signature), slot)

    return types.SimpleNamespace(QProcess=QProcess, QProcessEnvironment=QtCore.QProcessEnvironment,
                                 QTimer=QtCore.QTimer)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def engine_process(monkeypatch):
    """SSLMedSAM2Lib.engine_process imported on the PySide6 shim, and the application that runs its events."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6")
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    monkeypatch.setitem(sys.modules, "qt", _qt_shim())
    monkeypatch.delitem(sys.modules, "SSLMedSAM2Lib.engine_process", raising=False)
    return importlib.import_module("SSLMedSAM2Lib.engine_process"), app


@pytest.mark.skipif(os.name == "nt", reason="the fake Slicer bin folder uses POSIX shell scripts")
def test_cancel_stops_the_engine_process_not_only_the_launcher(tmp_path, slicer_bin, monkeypatch, engine_process):
    from filelock import FileLock

    from sslmedsam2.refine.events import EventLog

    engine_process, app = engine_process
    monkeypatch.setattr(sys, "executable", str(slicer_bin))  # as inside Slicer
    pidfile = tmp_path / "engine.pid"
    monkeypatch.setenv("SSLMEDSAM2_TEST_PIDFILE", str(pidfile))
    # a real engine command that runs until stopped: following a job that holds its lock and says "running"
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    (ws / "refine").mkdir()
    EventLog(ws / "refine").write_status({"state": "running", "round": 0, "pid": os.getpid(), "options": {"rounds": 1}})
    lock = FileLock(str(ws / "refine" / ".lock"))
    lock.acquire()
    process, finished, pid = engine_process.EngineProcess(), [], None
    process.finished.connect(finished.append)
    try:
        process.start(["refine", str(ws), "--follow"])
        deadline = time.time() + 60
        while time.time() < deadline and not (pidfile.exists() and pidfile.read_text().strip()):
            app.processEvents()
            time.sleep(0.05)
        pid = int(pidfile.read_text())
        time.sleep(1.0)
        app.processEvents()
        assert _alive(pid) and not finished, finished
        process.cancel()
        deadline = time.time() + 30
        while time.time() < deadline and not finished:
            app.processEvents()
            time.sleep(0.05)
        assert finished == ["cancelled"]
        deadline = time.time() + 10
        while time.time() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid), "the engine process survived Cancel"
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, 9)
        lock.release()


ENGINE_COMMAND = """#!/bin/sh
# Another Python environment's sslmedsam2, as the module runs it: what it got, a progress bar, its outcome.
printf '%s\\n' "$@" > "$SSLMEDSAM2_TEST_ARGS"
echo "PYTHONHOME=${{PYTHONHOME-unset}} PYTHONPATH=${{PYTHONPATH-unset}}" >> "$SSLMEDSAM2_TEST_ARGS"
printf 'pseudolabel:  50%%|#####     | 1/2 [00:01<00:01]\\r'
{ending}
"""


def _wait(app, done, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not done():
        app.processEvents()
        time.sleep(0.02)


@pytest.mark.skipif(os.name == "nt", reason="the fake engine command is a POSIX shell script")
def test_jobs_run_with_the_engine_command_outside_slicers_python(tmp_path, monkeypatch, engine_process):
    """Few-shot, predict and key slices in the QProcess, and the refine job, run as the engine command itself in
    the environment Slicer was started in (without Slicer's Python settings); its progress, error and a failed
    start reach the panel."""
    from SSLMedSAM2Lib import launch
    from SSLMedSAM2Lib.refine_control import RefineControl

    engine_process, app = engine_process
    recorded = tmp_path / "args.txt"
    slicer_startup = {**os.environ, "PYTHONHOME": "/opt/Slicer/lib/Python3", "PYTHONPATH": "/opt/Slicer/lib",
                      "SSLMEDSAM2_TEST_ARGS": str(recorded)}
    monkeypatch.setattr(launch, "_startup_environment", lambda: slicer_startup)
    for name in ("works", "fails"):
        (tmp_path / name).mkdir()
    works = _executable(tmp_path / "works" / "sslmedsam2", ENGINE_COMMAND.format(ending="exit 0"))
    fails = _executable(tmp_path / "fails" / "sslmedsam2", ENGINE_COMMAND.format(
        ending="echo 'sslmedsam2: error: no support labels in /data/labels' >&2; exit 2"))
    outside = ["PYTHONHOME=unset PYTHONPATH=unset"]

    process, finished, progress = engine_process.EngineProcess(), [], []
    process.finished.connect(finished.append)
    process.progress.connect(lambda done, total: progress.append((done, total)))
    process.start(["pseudolabel", "--query", "/data/q a"], command=str(works))
    _wait(app, lambda: finished)
    assert finished == [""] and progress == [(1, 2)]
    assert recorded.read_text().splitlines() == ["pseudolabel", "--query", "/data/q a", *outside]

    process.start(["predict", "ws"], command=str(fails))
    _wait(app, lambda: len(finished) == 2)
    assert finished[1] == "no support labels in /data/labels"

    process.start(["predict", "ws"], command=str(tmp_path / "gone" / "sslmedsam2"))
    _wait(app, lambda: len(finished) == 3)
    assert finished[2].startswith(f"could not start the engine command {tmp_path / 'gone' / 'sslmedsam2'}")

    ws = tmp_path / "ws"
    ws.mkdir()
    control = RefineControl(ws)
    control.start(["refine", str(ws), "--rounds", "2"], command=str(works))
    assert control.process.wait(timeout=30) == 0 and control.failure() is None
    assert recorded.read_text().splitlines() == ["refine", str(ws), "--rounds", "2", *outside]
    assert "1/2" in control.log_path.read_text(encoding="utf-8")
    control.start(["refine", str(ws)], command=str(fails))
    control.process.wait(timeout=30)
    assert control.failure() == "no support labels in /data/labels"
