"""How the module starts the engine: which interpreter, which environment, which process flags. No Slicer here.

Inside Slicer `sys.executable` is PythonSlicer (qSlicerCoreApplication sets it), a CTK AppLauncher that runs the
real interpreter (`python-real` in an installed Slicer) as a child and forwards no signal: terminating it leaves
the engine running and holding the GPU, and on Windows killing it orphans the engine. So the engine is started
with the real interpreter itself, in Slicer's own environment (which the Slicer launcher already set up with
PYTHONHOME, PYTHONPATH and the library paths), as SlicerNNUnet starts nnUNetv2_predict. Then a terminate or kill
of the started process reaches the engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

LAUNCHER = "PythonSlicer"
# Beside PythonSlicer: python-real in an installed Slicer, python / python3 in Slicer's build tree (python-install/bin)
REAL_INTERPRETERS = ("python-real", "python3", "python")

# Windows process creation flags (numbers, so that this file imports on every platform)
CREATE_NEW_PROCESS_GROUP = 0x00000200  # Ctrl+C / Ctrl+Break in Slicer's console group does not reach the job
CREATE_NO_WINDOW = 0x08000000  # a console without a window: none to close, and the job's children inherit it
STARTF_USESHOWWINDOW, SW_HIDE = 0x00000001, 0  # as slicer.util.launchConsoleProcess hides its console


def engine_source(module_file: str | Path = __file__) -> Path | None:
    """The folder holding the engine package: ../src in a source checkout, beside the module in a build tree or an
    installed extension (CMakeLists copies it to both)."""
    here = Path(module_file).resolve()
    for folder in (here.parents[2] / "src", here.parents[1]):
        if (folder / "sslmedsam2" / "__init__.py").is_file():
            return folder
    return None


def engine_environment() -> dict[str, str]:
    """Slicer's environment, with the engine on PYTHONPATH and unbuffered output (progress arrives as it happens)."""
    env = dict(os.environ)
    source = engine_source()
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Slicer's own Python settings: an engine in another Python environment (the engine command) must not inherit them
SLICER_PYTHON_VARIABLES = ("PYTHONHOME", "PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONSTARTUP", "PYTHONEXECUTABLE")
_startup_environment: Callable[[], Mapping[str, str]] = lambda: os.environ


def set_startup_environment(source: Callable[[], Mapping[str, str]]) -> None:
    """Where the environment Slicer was started in comes from (inside Slicer: slicer.util.startupEnvironment)."""
    global _startup_environment
    _startup_environment = source


def external_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an engine from another Python environment (the engine command): the one Slicer was started
    in (without the launcher's library paths), minus any Python setting, unbuffered."""
    environment = {k: v for k, v in (_startup_environment() if base is None else base).items()
                   if k not in SLICER_PYTHON_VARIABLES}
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def command_problem(command: str) -> str | None:
    """What is wrong with an engine command (the `sslmedsam2` of another Python environment), or None: a missing or
    non-executable file, or another sslmedsam2 version than the module's engine (its commands and files may differ)."""
    path = Path(command)
    if not path.is_file():
        return (f"Engine command {command}: no such file. Give the sslmedsam2 program of the Python environment that "
                "has the engine (bin/sslmedsam2, or Scripts\\sslmedsam2.exe on Windows).")
    if os.name != "nt" and not os.access(path, os.X_OK):
        return f"Engine command {command} is not executable (chmod +x it, or give that environment's sslmedsam2)."
    try:
        theirs = command_version(command)
    except RuntimeError as exc:
        text = str(exc).rstrip(".")
        return f"{text[0].upper()}{text[1:]}."
    ours = import_engine().__version__
    if theirs != ours:
        return (f"Engine command {command} is sslmedsam2 {theirs}, and this module's engine is {ours}: install "
                f"sslmedsam2 {ours} in that environment (the version of this extension), so that both read the same "
                "commands and files.")
    return None


_VERSIONS: dict[tuple[str, int], str] = {}  # (engine command, its file's modification time) -> its version


def command_version(command: str) -> str:
    """The engine command's sslmedsam2 version (`COMMAND --version`), asked again only once its file changed (a
    reinstall rewrites it)."""
    key = (command, Path(command).stat().st_mtime_ns)
    if key not in _VERSIONS:
        answer = _ask(command, ["--version"], 60.0).split()
        if len(answer) != 2 or answer[0] != "sslmedsam2":
            raise RuntimeError(f"the engine command {command} is not sslmedsam2 (--version answered "
                               f"{' '.join(answer)[:80]!r})")
        _VERSIONS[key] = answer[1]
    return _VERSIONS[key]


def external_models(command: str, timeout: float = 120.0) -> dict:
    """`COMMAND models --json`: the engine command's models and its own weights cache (whether each is there)."""
    import json

    return json.loads(_ask(command, ["models", "--json"], timeout))


def _ask(command: str, arguments: list[str], timeout: float) -> str:
    """The standard output of `COMMAND ARGUMENTS` in the engine command's environment; RuntimeError (one line)
    when it does not run or fails."""
    try:
        done = subprocess.run([command, *arguments], capture_output=True, text=True, timeout=timeout,
                              env=external_environment(), stdin=subprocess.DEVNULL, **child_options())
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"the engine command {command} did not run: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"the engine command {command} failed: {last}")
    return done.stdout


def python_interpreter(executable: str | None = None) -> str:
    """The interpreter itself: the real one beside Slicer's PythonSlicer launcher, else `executable` unchanged."""
    executable = executable or sys.executable
    path = Path(executable)
    windows = path.suffix.lower() == ".exe"
    if (path.stem if windows else path.name) != LAUNCHER:
        return executable
    for name in REAL_INTERPRETERS:
        candidate = path.with_name(name + (".exe" if windows else ""))
        if candidate.is_file():
            return str(candidate)
    return executable  # an unknown layout: still runs, but a cancel may not reach the engine


def engine_command(arguments: list[str], executable: str | None = None) -> tuple[str, list[str]]:
    """Program and arguments of `python -m sslmedsam2 ...` run by the real interpreter."""
    return python_interpreter(executable), ["-m", "sslmedsam2", *arguments]


def engine_program(arguments: list[str], command: str = "") -> tuple[str, list[str], dict[str, str]]:
    """Program, arguments and environment of `sslmedsam2 ARGUMENTS`: given an engine command (the sslmedsam2 of
    another Python environment), that program in the environment Slicer was started in; else `python -m
    sslmedsam2` run by Slicer's real interpreter in Slicer's environment."""
    if command:
        return command, list(arguments), external_environment()
    program, program_arguments = engine_command(arguments)
    return program, program_arguments, engine_environment()


def background_options(windows: bool = os.name == "nt") -> dict:
    """subprocess.Popen options for a job that outlives Slicer and shows no window.

    POSIX: a session of its own (closing Slicer or its terminal sends it no SIGHUP). Windows ignores
    start_new_session, and a console window would open whose closing kills the job: no window at all
    (CREATE_NO_WINDOW, and a hidden start as launchConsoleProcess does), in a process group of its own.
    """
    if not windows:
        return {"start_new_session": True}
    info = subprocess.STARTUPINFO()  # only on Windows
    info.dwFlags |= STARTF_USESHOWWINDOW
    info.wShowWindow = SW_HIDE
    return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW, "startupinfo": info}


def child_options(windows: bool = os.name == "nt") -> dict:
    """subprocess.Popen options for a helper that lives and dies with Slicer (the local engine server): on Windows
    no console window (CREATE_NO_WINDOW, hidden start); on POSIX nothing special (it stays in Slicer's session)."""
    if not windows:
        return {}
    info = subprocess.STARTUPINFO()  # only on Windows
    info.dwFlags |= STARTF_USESHOWWINDOW
    info.wShowWindow = SW_HIDE
    return {"creationflags": CREATE_NO_WINDOW, "startupinfo": info}


def import_engine() -> ModuleType:
    """The engine package in Slicer's own Python (for its Qt-free modules: workspace, monitor, review session)."""
    source = engine_source()
    if source is not None and str(source) not in sys.path:
        sys.path.insert(0, str(source))
    import sslmedsam2

    return sslmedsam2
