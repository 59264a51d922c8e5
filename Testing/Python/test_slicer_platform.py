"""The module on every platform: a Slicer older than 5.10 gets one message, the self-test passes through runTest()
where the engine cannot run, the remote path (and the engine command) works in a Slicer Python without torch, sam2
or nnunetv2, temporary exports of patient images go, plain http beyond this computer is confirmed once, and the
extension's metadata (licence, index entry, minimum Slicer, the shipped pyproject.toml) is ready for the index."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import types
import unittest
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SIZE, seeds_on, synthetic_case, to_image
from test_slicer_fakes import MODULE_DIR, install_fakes, slicer_fake

sys.path.insert(0, str(MODULE_DIR))

from SSLMedSAM2Lib.compatibility import (CONTRIBUTORS, MINIMUM_SLICER, pyproject_path,  # noqa: E402
                                         unsupported_reason)
from SSLMedSAM2Lib.requirements import Environment  # noqa: E402

ROOT = MODULE_DIR.parent
SLICER_510 = {"numpy": "2.0.2", "SimpleITK": "2.4.1", "requests": "2.32.3"}


def _import_module_file(monkeypatch, slicer):
    install_fakes(monkeypatch, slicer)
    import importlib

    return importlib.import_module("SSLMedSAM2")


# --- an old Slicer ------------------------------------------------------------------------------------------------
def test_the_files_an_old_slicer_loads_are_python_39():
    for path in (MODULE_DIR / "SSLMedSAM2.py", MODULE_DIR / "SSLMedSAM2Lib" / "__init__.py",
                 MODULE_DIR / "SSLMedSAM2Lib" / "compatibility.py"):
        ast.parse(path.read_text(), str(path), feature_version=(3, 9))
        imported = {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        assert not {"tomllib", "sslmedsam2"} & imported, path.name


def test_slicer_58_and_python_39_get_one_message():
    reason = unsupported_reason((5, 8), "3.9.10")
    assert "3D Slicer 5.10 or newer" in reason and "Slicer 5.8 with Python 3.9.10" in reason
    assert "nothing was installed" in reason and ">=3.11" in reason
    assert unsupported_reason((5, 10), "3.12.10") is None
    assert unsupported_reason((5, 10), "3.9.10"), "a Python older than requires-python alone is refused too"


def test_an_old_slicer_loads_the_module_shows_the_message_and_imports_nothing_else(monkeypatch, caplog):
    pytest.importorskip("PySide6")
    slicer = slicer_fake(5, 8)
    module = _import_module_file(monkeypatch, slicer)
    parent = types.SimpleNamespace()
    with caplog.at_level(logging.WARNING):
        module.SSLMedSAM2(parent)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "5.10 or newer" in warnings[0] and parent.helpText.startswith(warnings[0])
    assert parent.contributors == [CONTRIBUTORS]
    widget = module.SSLMedSAM2Widget()
    widget.setup()
    label = widget.layout.widgets[0]
    assert label.text == warnings[0] and label.wordWrap and widget.panel is None
    assert "SSLMedSAM2Lib.widget" not in sys.modules and "SSLMedSAM2Lib.logic" not in sys.modules
    widget.enter(), widget.exit(), widget.cleanup()  # no panel: nothing to do, no error
    with caplog.at_level(logging.INFO):
        module.SSLMedSAM2Test().runTest()  # passes: returns, no SkipTest
    assert any("self-test passed without running" in r.message for r in caplog.records)


# --- the self-test where the engine cannot run ----------------------------------------------------------------------
def test_the_self_test_passes_with_a_logged_reason_through_runtest(monkeypatch, caplog):
    """"Reload and Test" and the SelfTests module call runTest() directly: a SkipTest would be an error there."""
    pytest.importorskip("PySide6")
    slicer = slicer_fake(5, 10)
    module = _import_module_file(monkeypatch, slicer)
    from SSLMedSAM2Lib import requirements

    no_torch = Environment(SLICER_510.get, "Linux", "x86_64", "3.12.10")
    monkeypatch.setattr(requirements.Environment, "current", classmethod(lambda cls: no_torch))
    with caplog.at_level(logging.INFO):
        module.SSLMedSAM2Test().runTest()  # as slicer.selfTests[name]() runs it
    logged = [r.message for r in caplog.records if "self-test passed without the SAM2 propagation" in r.message]
    assert len(logged) == 1 and "torch (missing)" in logged[0]
    assert ("Clear", ()) in slicer.calls and any("Checking that the engine is found" in c[1] for c in slicer.calls
                                                  if c[0] == "delayDisplay")
    # as ctest's runUnitTest runs it: a TestCase whose result must be a success, without skips
    result = unittest.TestResult()
    module.SSLMedSAM2Test("runTest").run(result)
    assert result.wasSuccessful() and not result.skipped and result.testsRun == 1


def test_every_process_the_module_starts_opens_no_window_on_windows():
    """subprocess calls carry child_options() or background_options() (CREATE_NO_WINDOW and a hidden start);
    QProcess children of a GUI application get CREATE_NO_WINDOW from Qt itself."""
    for path in (MODULE_DIR / "SSLMedSAM2Lib").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess" and \
                    node.func.attr in ("run", "Popen", "call", "check_call", "check_output"):
                spread = [k.value.func.id for k in node.keywords if k.arg is None and isinstance(k.value, ast.Call)]
                if path.name == "requirements.py":  # sysctl, macOS only
                    continue
                assert set(spread) & {"child_options", "background_options"}, f"{path.name}:{node.lineno}"


# --- the remote path and the engine command in a Slicer without torch ----------------------------------------------
# the engine's requirements that neither Slicer bundles nor the thin client installs (import names), and sam2's own
BLOCKED = ("torch", "torchvision", "sam2", "nnunetv2", "pooch", "fastapi", "uvicorn", "pydantic", "itk", "isal",
           "tqdm", "matplotlib", "hydra", "iopath")
IMPORT_NAMES = {"itk-morphologicalcontourinterpolation": "itk"}
ENGINE_ONLY = ("sslmedsam2.models.cache", "sslmedsam2.propagation.builder")  # Slicer's own Python engine, self-test


def engine_modules_of_the_module() -> list[str]:
    """Every engine module the Slicer layer imports outside the self-test and the engine-only paths."""
    found = set()
    for path in (MODULE_DIR / "SSLMedSAM2Lib").glob("*.py"):
        if path.name != "testing.py":
            found |= {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
                      and (n.module or "").startswith("sslmedsam2")}
    return sorted(found - set(ENGINE_ONLY))

CHILD = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in this Slicer's Python", name=name)

sys.meta_path.insert(0, Blocked())
sys.path[:0] = [{tests!r}, {module!r}]
import numpy as np
from test_slicer_fakes import fake_modules, slicer_fake
sys.modules.update(fake_modules(slicer_fake()))
import SSLMedSAM2Lib.widget  # the whole Slicer side: panel, logic, study, install, engine session
import importlib
from pathlib import Path
from SSLMedSAM2Lib.dependencies import plan_install
from SSLMedSAM2Lib.interactive import InteractiveEngine, PropagationRequest, Reporter, VolumeSource
from SSLMedSAM2Lib.parameters import Connection, EngineSettings
from SSLMedSAM2Lib.requirements import CLIENT
from SSLMedSAM2Lib.server_process import LocalServer

case = json.load(open(sys.argv[1]))
seeds = np.load(case["seeds"])
image = open(case["image"], "rb").read()
settings = EngineSettings(model="sam2.1-tiny", checkpoint=case["checkpoint"], image_size=case["size"], device="cpu")
out = {{"client_plan_steps": len(plan_install(CLIENT).steps)}}
for name, connection in (("remote", Connection("remote", case["url"], case["token"])),
                         ("command", Connection("local", command=case["command"]))):
    local = LocalServer()
    engine = InteractiveEngine(local)
    source = VolumeSource((name,), "image.nrrd", "axial", "mri", image)
    result = engine.propagate(PropagationRequest(connection, settings, source, seeds, case["prompts"]),
                              Reporter(lambda kind, payload: None))
    drawn = {{1: [6, 11], 2: [9, 13]}}  # each label comes back exactly as drawn on its own slices
    out[name] = {{"kept": all(bool(np.array_equal(result.labels[z] == v, seeds[z] == v)) for v, zs in drawn.items()
                             for z in zs),
                 "grew": int((result.labels > 0).sum()) > int((seeds > 0).sum()), "where": result.where}}
    engine.close()
    local.stop()
for name in case["modules"]:  # what the panel's study, review and job buttons import from the engine
    importlib.import_module(name)
from sslmedsam2.fewshot.ranking import least_trustworthy_case
from sslmedsam2.refine.events import job_running
from sslmedsam2.study.workspace import Workspace, add_case, init_workspace
ws = Path(case["workspace"])
add_case(init_workspace(ws, {{"a": 1, "b": 2}}), Path(case["image"]), pseudo=Path(case["labels"]), case_id="c")
out["study"] = {{"cases": sorted(Workspace.open(ws).cases), "running": job_running(ws / "refine"),
                 "ranked": least_trustworthy_case(ws)}}
out["loaded"] = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
print(json.dumps(out))
"""


def test_the_child_blocks_every_requirement_beyond_the_thin_client():
    from SSLMedSAM2Lib.requirements import CLIENT, needed, project

    client = {r.name for r in needed(project().requirements, CLIENT)}
    beyond = {IMPORT_NAMES.get(r.name, r.name) for r in project().requirements} - client - set(SLICER_510) - \
        {"scipy", "pydicom"}  # bundled by Slicer 5.10 too (docs/slicer-api-check.md)
    assert beyond <= set(BLOCKED) and not client & set(BLOCKED)
    assert client == {"numpy", "requests", "filelock", "nibabel"}


def test_the_remote_path_and_the_engine_command_need_no_torch_in_slicers_python(tiny_checkpoint, tmp_path):
    from SSLMedSAM2Lib.server_process import free_port
    from sslmedsam2.server.limits import ServerSettings
    from sslmedsam2.server.main import serve_in_thread

    pytest.importorskip("PySide6")
    command = shutil.which("sslmedsam2", path=str(Path(sys.executable).parent))
    if command is None:
        pytest.skip("no sslmedsam2 program beside this Python (the package is not installed)")
    image, labels = synthetic_case(shape=(16, 48, 48))
    sitk.WriteImage(to_image(image), str(tmp_path / "image.nrrd"))
    seeds = seeds_on(labels, {1: [6, 11], 2: [9, 13]})
    np.save(tmp_path / "seeds.npy", seeds)
    sitk.WriteImage(to_image(seeds.astype(np.uint8)), str(tmp_path / "labels.nrrd"))
    token = tmp_path / "token"
    token.write_text("a-remote-token-of-enough-length\n")
    token.chmod(0o600)
    settings = ServerSettings(port=free_port(), device="cpu", model="sam2.1-tiny", checkpoint=tiny_checkpoint,
                              image_size=TINY_SIZE, workdir=tmp_path, tokens=[token.read_text().strip()])
    with serve_in_thread(settings) as (url, _):
        case = {"seeds": str(tmp_path / "seeds.npy"), "image": str(tmp_path / "image.nrrd"), "size": TINY_SIZE,
                "checkpoint": str(tiny_checkpoint), "url": url, "token": str(token), "command": command,
                "prompts": [6, 9, 11, 13], "labels": str(tmp_path / "labels.nrrd"),
                "workspace": str(tmp_path / "ws"), "modules": engine_modules_of_the_module()}
        (tmp_path / "case.json").write_text(json.dumps(case))
        script = CHILD.format(blocked=BLOCKED, tests=str(Path(__file__).parent), module=str(MODULE_DIR))
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "case.json")], capture_output=True,
                              text=True, timeout=600, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["client_plan_steps"] == 0 and out["loaded"] == []
    assert out["remote"] == {"kept": True, "grew": True, "where": f"the engine at {url}"}
    assert out["command"]["kept"] and out["command"]["grew"] and out["command"]["where"].startswith("the local engine")
    assert out["study"] == {"cases": ["c"], "running": False, "ranked": None}, "Add to study on the thin client"
    assert {"sslmedsam2.fewshot.ranking", "sslmedsam2.refine.events", "sslmedsam2.study.workspace"} <= \
        set(engine_modules_of_the_module())


def test_the_engine_command_runs_outside_slicers_python_settings(tmp_path):
    from SSLMedSAM2Lib import launch
    from SSLMedSAM2Lib.parameters import Connection, EngineSettings, connection_problems, jobs_problems
    from SSLMedSAM2Lib.server_process import LocalServer, key_of, needs_restart

    from sslmedsam2 import __version__

    slicer_env = {"PYTHONHOME": "/opt/Slicer/lib/Python", "PYTHONPATH": "/opt/Slicer/lib", "PYTHONNOUSERSITE": "1",
                  "PATH": "/usr/bin", "HOME": "/home/someone"}
    environment = launch.external_environment(slicer_env)
    assert environment == {"PATH": "/usr/bin", "HOME": "/home/someone", "PYTHONUNBUFFERED": "1"}
    launch.set_startup_environment(lambda: slicer_env)
    try:
        program, arguments, env = LocalServer()._program(["serve", "--port", "1"], "/native/bin/sslmedsam2")
    finally:
        launch.set_startup_environment(lambda: os.environ)
    assert (program, arguments) == ("/native/bin/sslmedsam2", ["serve", "--port", "1"]) and "PYTHONHOME" not in env
    settings = EngineSettings(device="mps")
    assert needs_restart(key_of(settings), key_of(settings, "/native/bin/sslmedsam2"))
    assert not needs_restart(key_of(settings, "/a"), key_of(settings, "/a"))
    assert Connection().need == "engine" and Connection(command="/a").need == "client"
    assert Connection("remote", "http://127.0.0.1:1").need == "client"
    assert "no such file" in connection_problems(Connection(command=str(tmp_path / "none")))[0]
    script = tmp_path / "sslmedsam2"
    answers = ('#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; exit 0; fi\n'
               "echo '{{\"models\": [{{\"name\": \"sam2.1-tiny\", \"cached\": true}}]}}'\n")
    script.write_text(answers.format(version=f"sslmedsam2 {__version__}"))
    if os.name != "nt":
        assert "not executable" in connection_problems(Connection(command=str(script)))[0]
        script.chmod(0o755)
        assert connection_problems(Connection(command=str(script))) == []
        assert launch.external_models(str(script))["models"][0]["cached"] is True
        script.write_text(answers.format(version="sslmedsam2 0.0.1"))  # a reinstall: its version is asked again
        os.utime(script, ns=(1, 1))  # another modification time, whatever the file system's clock resolution
        assert connection_problems(Connection(command=str(script))) == [
            f"Engine command {script} is sslmedsam2 0.0.1, and this module's engine is {__version__}: install "
            f"sslmedsam2 {__version__} in that environment (the version of this extension), so that both read the "
            "same commands and files."]
        script.write_text(answers.format(version="Python 3.12.1"))  # another program altogether
        os.utime(script, ns=(2, 2))
        problem = connection_problems(Connection(command=str(script)))[0]
        assert problem.startswith(f"The engine command {script} is not sslmedsam2") and "Python 3.12.1" in problem
        assert jobs_problems(Connection(command=str(script))) == [problem]
        assert jobs_problems(Connection("remote", "http://127.0.0.1:1", command=str(script))) == []


def test_on_a_mac_the_local_jobs_run_with_the_engine_command_and_are_off_without_it(monkeypatch):
    pytest.importorskip("PySide6")
    install_fakes(monkeypatch, slicer_fake())
    from SSLMedSAM2Lib.parameters import Connection
    from SSLMedSAM2Lib.requirements import CLIENT, ENGINE
    from SSLMedSAM2Lib.widget import LOCAL_JOBS, SSLMedSAM2PanelWidget

    own = {name: f"what {name} does" for name in LOCAL_JOBS}
    refusal = "The local engine cannot run inside Slicer on this Mac: ..."
    panel = types.SimpleNamespace(
        ui=types.SimpleNamespace(**{name: types.SimpleNamespace(enabled=True, toolTip=own[name]) for name in LOCAL_JOBS}),
        refusal=refusal, _toolTips=dict(own), logic=types.SimpleNamespace(connection=Connection()), busy=False,
        install=types.SimpleNamespace(installing=False), study=types.SimpleNamespace(following=False))
    panel._busy = lambda: panel.busy
    panel.available = lambda name: SSLMedSAM2PanelWidget.available(panel, name)

    def show(connection: Connection) -> dict:
        panel.logic.connection = connection
        SSLMedSAM2PanelWidget.showAvailability(panel)
        return {name: (getattr(panel.ui, name).enabled, getattr(panel.ui, name).toolTip == own[name])
                for name in LOCAL_JOBS}

    native = "/Users/me/sam/bin/sslmedsam2"
    assert show(Connection()) == {name: (False, False) for name in LOCAL_JOBS}
    assert all(getattr(panel.ui, name).toolTip == refusal for name in LOCAL_JOBS)
    assert show(Connection(command=native)) == {name: (True, True) for name in LOCAL_JOBS}
    assert Connection(command=native).jobs_need == CLIENT and Connection().jobs_need == ENGINE
    assert show(Connection("remote", "http://127.0.0.1:8765", command=native)) == \
        {name: (False, False) for name in LOCAL_JOBS}, "a remote engine's jobs would run in Slicer's Python"
    assert Connection("remote", "http://127.0.0.1:8765", command=native).jobs_need == ENGINE
    panel.study.following, panel.busy = True, False
    assert show(Connection(command=native))["refineButton"] == (False, True), "a followed job keeps Refine off"
    panel.study.following, panel.busy = False, True
    for name in LOCAL_JOBS:
        getattr(panel.ui, name).enabled = False  # as the run's start turned them off
    assert show(Connection(command=native)) == {name: (False, True) for name in LOCAL_JOBS}, "a run holds them"
    panel.refusal, panel.busy = None, False  # Linux, Windows: Slicer's own Python runs them
    assert show(Connection()) == {name: (True, True) for name in LOCAL_JOBS}


# --- plain http beyond this computer --------------------------------------------------------------------------------
def test_plain_http_to_another_machine_is_confirmed_once_with_the_reason(monkeypatch):
    from SSLMedSAM2Lib.parameters import Connection, plain_http_warning

    for url in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765", "https://gpu.lab:8765",
                "http://127.0.0.2:1", ""):
        assert plain_http_warning(url) == "", url
    warning = plain_http_warning("http://10.1.2.3:8765")
    assert "unencrypted" in warning and "SSH tunnel" in warning and "10.1.2.3:8765" in warning
    pytest.importorskip("PySide6")
    slicer = slicer_fake()
    install_fakes(monkeypatch, slicer)
    from SSLMedSAM2Lib.widget import SSLMedSAM2PanelWidget

    panel = types.SimpleNamespace(logic=types.SimpleNamespace(connection=Connection("remote", "http://10.1.2.3:8765")),
                                  _confirmedUrls=set())
    answers = [False, True]
    slicer.util.confirmOkCancelDisplay = lambda text, title: slicer.calls.append(("confirm", text)) or answers.pop(0)
    assert not SSLMedSAM2PanelWidget._confirmPlainHttp(panel)  # refused: nothing starts
    assert SSLMedSAM2PanelWidget._confirmPlainHttp(panel)
    assert SSLMedSAM2PanelWidget._confirmPlainHttp(panel)  # once: not asked again
    assert [c[1] for c in slicer.calls if c[0] == "confirm"] == [warning, warning]
    panel.logic.connection = Connection("remote", "http://127.0.0.1:8765")
    assert SSLMedSAM2PanelWidget._confirmPlainHttp(panel)


# --- temporary exports of patient images --------------------------------------------------------------------------
def test_few_shot_exports_go_when_the_job_ends_and_its_output_at_scene_close_or_exit(monkeypatch, tmp_path):
    pytest.importorskip("PySide6")
    from PySide6.QtWidgets import QApplication

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QApplication.instance() or QApplication([])
    slicer = slicer_fake()
    install_fakes(monkeypatch, slicer)
    from SSLMedSAM2Lib import logic as logic_module
    from SSLMedSAM2Lib import study_io
    from SSLMedSAM2Lib.parameters import EngineSettings
    from SSLMedSAM2Lib.temporary import TEMPORARY

    def export_supports(nodes, found, folder):
        for sub in ("images", "labels"):
            (folder / sub).mkdir()
            (folder / sub / "patient.nrrd").write_text("voxels")
        return str(folder / "images"), str(folder / "labels")

    def export_queries(nodes, names, folder):
        (folder / "query.nrrd").write_text("voxels")
        return str(folder)

    monkeypatch.setattr(study_io, "export_supports", export_supports)
    monkeypatch.setattr(study_io, "export_queries", export_queries)
    from SSLMedSAM2Lib import launch

    monkeypatch.setattr(launch, "_startup_environment", launch._startup_environment)  # the logic sets Slicer's
    logic = logic_module.SSLMedSAM2Logic()
    assert any(c[0] == "connect" and c[1][0] == "aboutToQuit()" for c in slicer.calls)
    runs = []
    monkeypatch.setattr(logic, "run_command", lambda arguments, then: runs.append((arguments, then)))
    finished = []
    logic.runFinished.connect(finished.append)

    def start():
        return logic.run_few_shot(EngineSettings(), "", "", "", "", 5, 0, support_nodes=["s"], query_nodes=["q"])

    output = Path(start())
    arguments, then = runs[-1]
    exports = [Path(arguments[arguments.index("--support-images") + 1]).parent, Path(arguments[arguments.index("--query") + 1])]
    assert all(folder.is_dir() for folder in exports) and output.is_dir()
    then("")  # the job ended
    assert not any(folder.exists() for folder in exports), "the exported patient images are deleted"
    assert output.is_dir() and finished == [""], "the results stay for the review"
    logic.scene_closed()
    assert not output.exists() and logic.fewshot_output is None
    deadline = time.monotonic() + 30
    while logic.worker.pump() and time.monotonic() < deadline:  # the session's close, queued by the scene close
        time.sleep(0.01)

    output = Path(start())
    exports = [Path(runs[-1][0][runs[-1][0].index("--query") + 1])]
    runs[-1][1]("the engine stopped")  # a failed run: nothing to review, nothing kept
    assert not output.exists() and not exports[0].exists()

    output = Path(start())
    leftover = TEMPORARY.make("SSLMedSAM2-other-")
    logic_module._at_exit()  # Slicer's exit (aboutToQuit, atexit)
    assert not output.exists() and not leftover.exists() and TEMPORARY.folders == []

    with pytest.raises(ValueError, match="Choose the"):  # a refused start leaves no export behind
        logic.run_few_shot(EngineSettings(), "", "", "", "", 5, 0, support_nodes=["s"], query_nodes=[])
    assert TEMPORARY.folders == []

    users = tmp_path / "my results"  # a folder the module did not make is never deleted by it
    users.mkdir()
    (users / "case.nii.gz").write_text("voxels")
    TEMPORARY.remove(users, str(users), None)
    assert (users / "case.nii.gz").read_text() == "voxels"


# --- the extension's metadata ---------------------------------------------------------------------------------------
def _cmake_value(text: str, name: str) -> str:
    return re.search(rf'set\({name} "([^"]*)"\)', text).group(1)


INDEX_SCHEMA = {  # Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json, its constraints
    "type": "object", "required": ["$schema", "category", "scm_url"], "additionalProperties": False,
    "properties": {"$schema": {"type": "string"}, "category": {"type": "string"}, "scm_url": {"type": "string"},
                   "scm_revision": {"type": "string"}, "scm_type": {"type": "string", "enum": ["git", "local"]},
                   "build_dependencies": {"type": "array", "items": {"type": "string"}},
                   "build_subdirectory": {"type": "string"}, "enabled": {"type": "boolean"},
                   "tier": {"type": "integer", "minimum": 1, "maximum": 5}}}


def test_the_extension_is_ready_for_the_index():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    licence = (ROOT / "LICENSE").read_text()
    assert licence.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in licence
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()
    assert _cmake_value(cmake, "EXTENSION_CONTRIBUTORS") == CONTRIBUTORS
    entry = json.loads((ROOT / "SSLMedSAM2.json").read_text())
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(entry, INDEX_SCHEMA)
    assert entry["build_dependencies"] == _cmake_value(cmake, "EXTENSION_DEPENDS").split() == ["PyTorch"]
    assert entry["category"] == _cmake_value(cmake, "EXTENSION_CATEGORY")
    assert entry["scm_url"].removesuffix(".git") == _cmake_value(cmake, "EXTENSION_HOMEPAGE")
    prefix = "https://raw.githubusercontent.com/sslmedsam2/SSLMedSAM2/main/"
    urls = _cmake_value(cmake, "EXTENSION_SCREENSHOTURLS").split() + [_cmake_value(cmake, "EXTENSION_ICONURL")]
    for url in urls:  # each points at a file of this repository
        assert url.startswith(prefix) and (ROOT / url.removeprefix(prefix)).is_file(), url
    minimum = _cmake_value(cmake, "SSLMedSAM2_MINIMUM_SLICER_VERSION")
    assert tuple(int(p) for p in minimum.split(".")) == MINIMUM_SLICER
    assert re.search(r"if\(Slicer_VERSION VERSION_LESS SSLMedSAM2_MINIMUM_SLICER_VERSION\)\s+message\(FATAL_ERROR",
                     cmake)


def test_the_pyproject_ships_with_the_module_and_is_found_there(tmp_path):
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert re.search(r"sslmedsam2_copy_pyproject\(\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./pyproject\.toml\s+"
                     r"\$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}/sslmedsam2-pyproject\.toml\)", cmake)
    assert re.search(r"install\(FILES \$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./pyproject\.toml\s+DESTINATION "
                     r"\$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}\s+COMPONENT RuntimeLibraries\s+RENAME "
                     r"sslmedsam2-pyproject\.toml", cmake)
    assert pyproject_path() == ROOT / "pyproject.toml"  # the source checkout
    modules = tmp_path / "lib" / "Slicer-5.10" / "qt-scripted-modules"
    (modules / "SSLMedSAM2Lib").mkdir(parents=True)
    module_file = modules / "SSLMedSAM2Lib" / "compatibility.py"
    shutil.copy(MODULE_DIR / "SSLMedSAM2Lib" / "compatibility.py", module_file)
    assert pyproject_path(str(module_file)) is None
    if shutil.which("cmake") is None:
        shutil.copy(ROOT / "pyproject.toml", modules / "sslmedsam2-pyproject.toml")
    else:
        script = tmp_path / "copy.cmake"
        script.write_text(textwrap.dedent(f"""\
            include({(MODULE_DIR / 'CMake' / 'SSLMedSAM2CopyEngine.cmake').as_posix()})
            sslmedsam2_copy_pyproject({(ROOT / 'pyproject.toml').as_posix()}
              {(modules / 'sslmedsam2-pyproject.toml').as_posix()})
            """))
        done = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert pyproject_path(str(module_file)) == modules / "sslmedsam2-pyproject.toml"
    assert (modules / "sslmedsam2-pyproject.toml").read_bytes() == (ROOT / "pyproject.toml").read_bytes()
