"""Dependencies in Slicer's Python: the install plan on simulated Slicers (old torch, old sam2, a wrong nnunetv2,
macOS x86_64 with torch 2.2.2, Python 3.9, the remote-only client), every version read from pyproject.toml, the
constraints that keep Slicer's numpy and SimpleITK, the runner with a fake pip that streams its lines and fails,
and the panel that runs it without freezing Slicer (buttons off meanwhile, the failure with pip's output)."""

from __future__ import annotations

import os
import re
import sys
import time
import types

import pytest
from test_slicer_fakes import MODULE_DIR, install_fakes, slicer_fake

sys.path.insert(0, str(MODULE_DIR))

from SSLMedSAM2Lib.dependencies import (CONSTRAINTS, MissingDependencies, constraints_text,  # noqa: E402
                                        describe, plan_install, require, run_guarded, self_test_skip_reason)
from SSLMedSAM2Lib.requirements import (CLIENT, ENGINE, Environment, RequirementsMissing, project,  # noqa: E402
                                        read_pyproject)

ROOT = MODULE_DIR.parent
SLICER_510 = {"numpy": "2.0.2", "SimpleITK": "2.4.1", "requests": "2.32.3", "scipy": "1.13.1", "pydicom": "2.4.4",
              "packaging": "25.0"}  # what Slicer 5.10 bundles (SuperBuild/External_python-*.cmake)


def slicer(extra: dict | None = None, system: str = "Linux", machine: str = "x86_64", python: str = "3.12.10",
           rosetta: bool = False, loaded: tuple = ()) -> Environment:
    versions = {**SLICER_510, **(extra or {})}
    return Environment(versions.get, system, machine, python, rosetta, frozenset(loaded))


def everything() -> dict:
    """Every requirement of pyproject.toml installed at a version that satisfies it."""
    versions = {}
    for requirement in project().requirements:
        candidates = [s.version for s in requirement.specifier if s.operator in ("==", ">=")] or ["1.0"]
        versions[requirement.name] = candidates[0]
    return {**versions, "torchvision": "0.21.0", **SLICER_510}


def pip_steps(plan):
    return [step for step in plan.steps if step.module == "pip"]


# --- one source of truth --------------------------------------------------------------------------------------------
def test_the_requirements_are_read_from_pyproject_never_copied(tmp_path):
    from packaging.requirements import Requirement

    table = read_pyproject(ROOT / "pyproject.toml")["project"]
    engine = project()
    assert [str(r) for r in engine.requirements] == [str(Requirement(text)) for text in table["dependencies"]]
    assert str(engine.requires_python) == table["requires-python"]
    # another pyproject, other versions: the plan follows it
    text = (ROOT / "pyproject.toml").read_text().replace('"sam2==1.1.0"', '"sam2==1.2.0"')
    (tmp_path / "pyproject.toml").write_text(text)
    plan = plan_install(ENGINE, slicer(everything()), project(tmp_path / "pyproject.toml"))
    assert [s.arguments[-1] for s in plan.steps] == ["sam2==1.2.0"]
    # no requirement's version is written in the module's code
    pins = set(re.findall(r'"([A-Za-z0-9_.-]+)(==|>=)([0-9][^",<]*)', (ROOT / "pyproject.toml").read_text()))
    assert len(pins) > 10
    for path in (MODULE_DIR / "SSLMedSAM2Lib").glob("*.py"):
        code = path.read_text()
        for name, operator, version in pins:
            assert f"{name}{operator}{version}" not in code, (path.name, name)


def test_a_missing_pyproject_is_said_plainly(monkeypatch):
    from SSLMedSAM2Lib import requirements

    monkeypatch.setattr(requirements, "pyproject_path", lambda: None)
    with pytest.raises(RequirementsMissing, match="sslmedsam2-pyproject.toml.*reinstall the SSLMedSAM2 extension"):
        requirements.read_pyproject()


# --- plans on simulated Slicers -------------------------------------------------------------------------------------
def test_a_fresh_slicer_gets_torch_first_then_sam2_against_it_then_the_rest():
    plan = plan_install(ENGINE, slicer())
    modules = [(s.module, s.arguments[1] if s.module == "pip" and "--no-build-isolation" in s.arguments else "")
               for s in plan.steps]
    assert modules == [("pip", ""), ("light_the_torch", ""), ("pip", "--no-build-isolation"), ("pip", "")]
    ltt, torch, sam2, rest = plan.steps
    assert "light-the-torch>=0.5" in ltt.arguments
    torch_spec = str(project().requirement("torch"))
    assert torch.arguments[:3] == ("install", torch_spec, "torchvision")  # as PyTorchUtils' installTorch
    assert sam2.arguments[-1] == str(project().requirement("sam2")) and dict(sam2.environment) == {"SAM2_BUILD_CUDA": "0"}
    assert "nnunetv2<2.9,>=2.8.1" in rest.arguments
    for step in plan.steps:  # every pip call carries the constraints; Slicer's own packages are never requested
        assert step.arguments[step.arguments.index("-c") + 1] == CONSTRAINTS
        assert not any(a.split("=")[0].split(">")[0] in ("numpy", "SimpleITK") for a in step.arguments)
    text = describe(plan)
    assert "numpy 2.0.2, SimpleITK 2.4.1 are kept" in text and "Slicer stays usable" in text


def test_constraints_pin_slicers_numpy_and_simpleitk_and_a_fitting_torch_only():
    assert constraints_text(slicer()).splitlines() == ["numpy==2.0.2", "SimpleITK==2.4.1"]
    assert constraints_text(slicer({"torch": "2.6.0+cu124"})).splitlines() == \
        ["numpy==2.0.2", "SimpleITK==2.4.1", "torch==2.6.0+cu124"]
    assert "torch" not in constraints_text(slicer({"torch": "2.1.0"}))  # the one being replaced is not pinned


def test_an_old_torch_of_another_extension_is_replaced_or_refused_while_loaded():
    plan = plan_install(ENGINE, slicer({**everything(), "torch": "2.1.0"}))
    assert [s.module for s in plan.steps] == ["pip", "light_the_torch"]
    assert plan.steps[1].arguments[1] == str(project().requirement("torch"))
    assert any(c.startswith("replace torch 2.1.0") and "other extensions" in c for c in plan.changes)
    loaded = plan_install(ENGINE, slicer({**everything(), "torch": "2.1.0"}, loaded=("torch",)))
    assert not loaded.steps and "restart Slicer" in loaded.problems[0] and "2.1.0" in loaded.problems[0]
    with pytest.raises(MissingDependencies, match="loaded in this Slicer session"):
        require(ENGINE, slicer({**everything(), "torch": "2.1.0"}, loaded=("torch",)))


def test_an_old_sam2_and_a_wrong_nnunetv2_are_replaced_by_the_right_versions():
    for nnunet in ("2.5.1", "2.9.0"):
        plan = plan_install(ENGINE, slicer({**everything(), "sam2": "0.4.1", "nnunetv2": nnunet}, loaded=("nnunetv2",)))
        sam2, rest = pip_steps(plan)
        assert sam2.arguments[-1] == "sam2==1.1.0" and "--no-build-isolation" in sam2.arguments
        assert rest.arguments[-1] == "nnunetv2<2.9,>=2.8.1"
        assert f"replace nnunetv2 {nnunet} with nnunetv2<2.9,>=2.8.1" in describe(plan)
        assert plan.restart == ("nnunetv2",) and "Restart Slicer afterwards" in describe(plan)
        assert "sam2 0.4.1 (needs ==1.1.0)" in plan.absent
    assert plan_install(ENGINE, slicer(everything())).ready


def test_torchvision_comes_with_the_installed_torchs_build():
    versions = {**everything(), "torch": "2.6.0+cu124"}
    del versions["torchvision"]
    plan = plan_install(ENGINE, slicer(versions))
    assert [s.module for s in plan.steps] == ["pip", "light_the_torch"]
    assert plan.steps[1].arguments[1:3] == ("torch==2.6.0+cu124", "torchvision")


def test_macos_x86_64_refuses_the_local_engine_with_the_two_ways_that_work():
    mac = slicer({**everything(), "torch": "2.2.2"}, system="Darwin", rosetta=True)
    plan = plan_install(ENGINE, mac)
    assert not plan.steps and len(plan.problems) == 1
    message = plan.problems[0]
    for words in ("x86_64", "Rosetta", "2.2.2", "torch>=2.5.1", "remote", "SSH tunnel", "Engine command", "mps",
                  "127.0.0.1"):
        assert words in message, words
    assert plan_install(CLIENT, mac).ready, "the thin client works on a Mac"
    with pytest.raises(MissingDependencies, match="Engine command"):
        require(ENGINE, mac)
    assert "Rosetta" not in plan_install(ENGINE, slicer(system="Darwin")).problems[0]  # an Intel Mac
    assert plan_install(ENGINE, slicer(everything(), system="Darwin", machine="arm64")).ready  # a native arm64 Python


def test_python_39_installs_nothing():
    old = slicer(python="3.9.10")
    for need in (CLIENT, ENGINE):
        plan = plan_install(need, old)
        assert not plan.steps and "Python 3.9.10" in plan.problems[0] and "5.10" in plan.problems[0]


def test_slicers_own_packages_are_never_replaced():
    plan = plan_install(CLIENT, slicer({"numpy": "1.21.0"}))
    assert not plan.steps and "never replaced" in plan.problems[0] and "numpy 1.21.0" in plan.problems[0]


def test_the_remote_only_plan_needs_the_thin_client_only():
    thin = [str(project().requirement(name)) for name in ("filelock", "nibabel")]
    client = plan_install(CLIENT, slicer())  # Slicer 5.10 bundles numpy and requests
    assert [s.module for s in client.steps] == ["pip"] and list(client.steps[0].arguments[-2:]) == thin
    assert "torch" not in describe(client) and "sam2" not in describe(client) and "nnunetv2" not in describe(client)
    assert plan_install(CLIENT, slicer({"filelock": "3.16.1", "nibabel": "5.3.2"})).ready
    missing = plan_install(CLIENT, slicer({"requests": None, "filelock": "3.16.1", "nibabel": "5.3.2"}))
    assert [s.arguments[-1] for s in missing.steps] == [str(project().requirement("requests"))]
    with pytest.raises(MissingDependencies, match="few-shot and the study's nnU-Net run on this computer.*Engine "
                                                  "command"):
        require(ENGINE, slicer(), engine_choice=CLIENT)


def test_every_engine_button_failure_ends_in_a_dialog():
    dialogs, ran = [], []

    def show(text, details):
        dialogs.append((text, details))

    assert not run_guarded("SSLMedSAM2 could not start the propagation.", lambda: ran.append(1), show,
                           lambda: require(ENGINE, slicer({**everything(), "sam2": None})))
    assert not ran and "Check and install dependencies" in dialogs[-1][0] and "sam2 (missing)" in dialogs[-1][0]
    assert dialogs[-1][0].startswith("SSLMedSAM2 could not start the propagation.")

    def imports_a_missing_package():
        raise ModuleNotFoundError("No module named 'pooch'", name="pooch")

    assert not run_guarded("Few-shot", imports_a_missing_package, show, lambda: None)
    assert "The Python package pooch is missing" in dialogs[-1][0] and "ModuleNotFoundError" in dialogs[-1][1]
    count = len(dialogs)
    assert run_guarded("Propagate", lambda: ran.append(1), show, lambda: None) and ran == [1] and len(dialogs) == count


def test_the_self_test_reason_names_what_is_missing():
    assert "torch (missing)" in self_test_skip_reason(slicer())
    assert "x86_64" in self_test_skip_reason(slicer({"torch": "2.2.2"}, system="Darwin"))
    assert self_test_skip_reason(slicer(everything())) is None


# --- the runner: a fake pip in a real QProcess ----------------------------------------------------------------------
FAKE_PYTHON = """#!{python}
import os, sys, time
from pathlib import Path
record = Path(os.environ["FAKE_PIP_RECORD"])
with record.open("a") as out:
    constraints = sys.argv[sys.argv.index("-c") + 1]
    out.write(repr((sys.argv[1:], Path(constraints).read_text(), os.environ.get("SAM2_BUILD_CUDA"))) + "\\n")
if "light_the_torch" in sys.argv:
    print("Collecting torch>=2.5.1", flush=True)
    time.sleep(0.5)
    print("Successfully installed torch-2.6.0", flush=True)
    sys.exit(0)
print("Collecting sam2==1.1.0", flush=True)
time.sleep(1.0)
sys.stdout.write("  Building wheel for sam2 (pyproject.toml) ... \\r")
sys.stdout.flush()
print("error", flush=True)
print("ERROR: Failed building wheel for sam2", file=sys.stderr, flush=True)
sys.exit(1)
"""


@pytest.fixture
def qt_app(monkeypatch, tmp_path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6")
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    install_fakes(monkeypatch, slicer_fake())
    fake = tmp_path / "python-real"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_PIP_RECORD", str(tmp_path / "record.txt"))
    return app, fake, tmp_path / "record.txt"


def _wait(app, done: list, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.01)
    assert done, "the install did not end"


@pytest.mark.skipif(os.name == "nt", reason="the fake interpreter is a script with a #! line")
def test_the_runner_streams_pips_lines_and_stops_at_a_failure_with_its_output(qt_app, tmp_path):
    from SSLMedSAM2Lib.installer import InstallRunner

    app, fake, record = qt_app
    plan = plan_install(ENGINE, slicer({**everything(), "torch": "2.1.0", "sam2": "0.4.1", "pooch": None, "light-the-torch": "0.7"}))
    runner = InstallRunner(program=lambda: str(fake))
    lines, steps, done = [], [], []
    runner.line.connect(lambda text: lines.append((time.monotonic(), text)))
    runner.step.connect(lambda *args: steps.append(args))
    runner.finished.connect(lambda error, output: done.append((time.monotonic(), error, output)))
    versions = [slicer({"torch": "2.1.0"}), slicer({"torch": "2.6.0"})]
    runner.start(list(plan.steps), lambda: constraints_text(versions.pop(0)), tmp_path)
    assert runner.running
    with pytest.raises(RuntimeError, match="already running"):
        runner.start(list(plan.steps), lambda: "", tmp_path)
    _wait(app, done)
    end, error, output = done[0]
    assert not runner.running
    assert [s[:2] for s in steps] == [(1, 3), (2, 3)], "the step after the failed one never ran"
    texts = [text for _, text in lines]
    assert texts[0].startswith(f"$ {fake} -m light_the_torch install torch>=2.5.1 torchvision -c ")
    assert "Collecting sam2==1.1.0" in texts and "  Building wheel for sam2 (pyproject.toml) ..." in texts
    first = next(t for t, text in lines if text == "Collecting sam2==1.1.0")
    assert end - first > 0.5, "lines arrive while pip runs, not at its end"
    assert "step 2 of 3" in error and "ERROR: Failed building wheel for sam2" in error and "exit code 1" in error
    assert "Collecting sam2==1.1.0" in output and "Successfully installed torch-2.6.0" in output
    calls = [eval(line) for line in record.read_text().splitlines()]  # noqa: S307 (our own repr)
    assert calls[0][1] == "numpy==2.0.2\nSimpleITK==2.4.1\n"  # the torch being replaced is not pinned
    assert calls[1][1].endswith("torch==2.6.0\n"), "the constraints are written again: the new torch is pinned"
    assert calls[1][2] == "0" and "--no-build-isolation" in calls[1][0]


class Widget:
    def __init__(self) -> None:
        self.enabled, self.visible, self.text, self.lines, self.slots = True, False, "", [], []

    def connect(self, signature, slot):
        self.slots.append(slot)

    def setText(self, text):  # noqa: N802 (Qt's names)
        self.text = text

    def appendPlainText(self, text):  # noqa: N802
        self.lines.append(text)

    def clear(self):
        self.lines = []

    def setMaximumBlockCount(self, count):  # noqa: N802
        self.maximum = count


@pytest.mark.skipif(os.name == "nt", reason="the fake interpreter is a script with a #! line")
def test_the_panel_installs_in_the_background_with_buttons_off_and_shows_a_failure(qt_app, tmp_path):
    from SSLMedSAM2Lib.install_panel import ENGINE_BUTTONS, INSTALLING, InstallPanel
    from SSLMedSAM2Lib.installer import InstallRunner
    from SSLMedSAM2Lib.temporary import TEMPORARY

    app, fake, record = qt_app
    names = ("installButton", "installLog", "dependencyStatusLabel", *ENGINE_BUTTONS)
    ui = types.SimpleNamespace(**{name: Widget() for name in names})
    ui.refineButton.enabled = False  # a refine job is followed: the install must not turn it on
    dialogs = []
    answers = types.SimpleNamespace(
        errorDisplay=lambda text, **kw: dialogs.append(("error", text, kw)),
        confirmOkCancelDisplay=lambda text, title="": dialogs.append(("confirm", text)) or True,
        restart=lambda: dialogs.append(("restart",)))
    environment = slicer({**everything(), "torch": "2.1.0", "sam2": "0.4.1", "pooch": None, "light-the-torch": "0.7"})
    done = []
    runner = InstallRunner(program=lambda: str(fake))
    runner.finished.connect(lambda *args: done.append(args))
    available = {"predictButton": True}
    panel = InstallPanel(ui, answers, lambda: ENGINE, runner=runner, environment=lambda: environment,
                         available=lambda name: available.get(name, True))
    ui.installButton.slots[0]()  # the click
    available["predictButton"] = False  # meanwhile, on a Mac, the engine command was cleared: no job can run
    assert dialogs[0][0] == "confirm" and "replace sam2 0.4.1 with sam2==1.1.0" in dialogs[0][1]
    assert panel.installing and not ui.installButton.enabled and ui.installLog.visible
    assert all(not getattr(ui, name).enabled for name in ENGINE_BUTTONS)
    with pytest.raises(MissingDependencies, match=re.escape(INSTALLING)):
        panel.check()
    folder = panel._folder
    assert folder.is_dir() and folder in TEMPORARY.folders
    ui.installButton.slots[0]()  # a second click meanwhile starts nothing
    assert [d[0] for d in dialogs] == ["confirm"]
    _wait(app, done)
    assert ui.installButton.enabled and not panel.installing
    assert all(getattr(ui, name).enabled for name in ENGINE_BUTTONS if name not in ("refineButton", "predictButton"))
    assert not ui.refineButton.enabled and not ui.predictButton.enabled
    kind, text, details = dialogs[-1]
    assert kind == "error" and "Failed building wheel for sam2" in text
    assert "Collecting sam2==1.1.0" in details["detailedText"]
    assert "Collecting sam2==1.1.0" in ui.installLog.lines and "failed" in ui.dependencyStatusLabel.text
    assert not folder.exists(), "the constraints' folder is deleted"
    assert len(record.read_text().splitlines()) == 2


def test_the_panel_says_what_cannot_be_installed_and_installs_nothing(monkeypatch):
    install_fakes(monkeypatch, slicer_fake())
    pytest.importorskip("PySide6")
    from SSLMedSAM2Lib.install_panel import InstallPanel

    ui = types.SimpleNamespace(**{name: Widget() for name in ("installButton", "installLog", "dependencyStatusLabel")})
    dialogs = []
    answers = types.SimpleNamespace(errorDisplay=lambda text, **kw: dialogs.append(text),
                                    confirmOkCancelDisplay=lambda *a: pytest.fail("nothing to confirm"))
    runner = types.SimpleNamespace(running=False, line=types.SimpleNamespace(connect=lambda s: None),
                                   step=types.SimpleNamespace(connect=lambda s: None),
                                   finished=types.SimpleNamespace(connect=lambda s: None))
    mac = slicer({"torch": "2.2.2"}, system="Darwin", rosetta=True)
    InstallPanel(ui, answers, lambda: ENGINE, runner=runner, environment=lambda: mac).onInstall()
    assert "x86_64" in dialogs[0] and "x86_64" in ui.dependencyStatusLabel.text
    mac = slicer({"torch": "2.2.2", "filelock": "3.16.1", "nibabel": "5.3.2"}, system="Darwin", rosetta=True)
    InstallPanel(ui, answers, lambda: CLIENT, runner=runner, environment=lambda: mac).onInstall()
    assert "thin client" in ui.dependencyStatusLabel.text and "is installed" in ui.dependencyStatusLabel.text
