"""Stand-ins for Slicer's `slicer`, `qt` and `vtk` modules, shared by the Slicer module's headless tests (no test here).

`qt` is PySide6's QtCore behind the few PythonQt names the module uses (PythonQt connects by signature string); the
rest are small fakes that behave as Slicer 5.10's source says (docs/slicer-api-check.md).
"""

from __future__ import annotations

import sys
import types
import unittest
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2] / "SSLMedSAM2"


def qt_shim() -> types.ModuleType:
    from PySide6 import QtCore

    class QProcess(QtCore.QProcess):
        def connect(self, signature: str, slot) -> bool:
            return QtCore.QObject.connect(self, QtCore.SIGNAL(signature), slot)

    class QTimer(QtCore.QTimer):
        def connect(self, signature: str, slot) -> bool:
            return QtCore.QObject.connect(self, QtCore.SIGNAL(signature), slot)

    class QLabel:
        def __init__(self, text: str = "") -> None:
            self.text, self.wordWrap = text, False

    qt = types.ModuleType("qt")
    qt.QProcess, qt.QProcessEnvironment, qt.QTimer, qt.QLabel = QProcess, QtCore.QProcessEnvironment, QTimer, QLabel
    return qt


class Layout:
    def __init__(self) -> None:
        self.widgets: list = []

    def addWidget(self, widget) -> None:  # noqa: N802 (Qt's names)
        self.widgets.append(widget)

    def addStretch(self, stretch: int = 0) -> None:  # noqa: N802
        self.widgets.append(("stretch", stretch))


def slicer_fake(major: int = 5, minor: int = 10, calls: list | None = None) -> types.ModuleType:
    """`slicer` with app (version, connect), util (dialogs recorded in `calls`, startupEnvironment),
    ScriptedLoadableModule and parameterNodeWrapper submodules, and the node classes the module names."""
    calls = [] if calls is None else calls
    slicer = types.ModuleType("slicer")
    slicer.app = types.SimpleNamespace(majorVersion=major, minorVersion=minor,
                                       connect=lambda *args: calls.append(("connect", args)) or True)
    slicer.mrmlScene = types.SimpleNamespace(Clear=lambda *args: calls.append(("Clear", args)),
                                             StartCloseEvent=1, EndCloseEvent=2, EndImportEvent=3)
    util = types.ModuleType("slicer.util")
    util.startupEnvironment = lambda: {"PATH": "/usr/bin", "HOME": "/home/someone"}
    util.errorDisplay = lambda text, **kw: calls.append(("errorDisplay", text, kw))
    util.confirmOkCancelDisplay = lambda text, *args, **kw: calls.append(("confirm", text)) or True
    util.restart = lambda: calls.append(("restart",))
    util.delayDisplay = lambda text, *args, **kw: calls.append(("delayDisplay", text))

    class VTKObservationMixin:
        def __init__(self) -> None:
            pass

    util.VTKObservationMixin = VTKObservationMixin
    slicer.util = util
    for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkSegmentation"):
        setattr(slicer, name, type(name, (), {"SourceRepresentationModified": 4}))

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            self.layout = Layout()

        def setup(self) -> None:
            pass

        def resourcePath(self, name: str) -> str:  # noqa: N802
            return str(MODULE_DIR / "Resources" / name)

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):  # noqa: N802
            return None

    class ScriptedLoadableModuleTest(unittest.TestCase):
        """As Slicer's: a TestCase whose runTest the module overrides; delayDisplay shows a message."""

        def delayDisplay(self, message, requestedDelay=None, msec=None):  # noqa: N802
            calls.append(("delayDisplay", message))

    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    slicer.ScriptedLoadableModule = scripted

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.Choice = wrapper.WithinRange = lambda *args: ("annotation", args)
    wrapper.parameterNodeWrapper = lambda cls: cls
    slicer.parameterNodeWrapper = wrapper
    slicer.calls = calls
    return slicer


def vtk_fake() -> types.ModuleType:
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=33)
    return vtk


def fake_modules(slicer: types.ModuleType) -> dict[str, types.ModuleType]:
    """sys.modules entries that stand in for Slicer's Python modules."""
    return {"slicer": slicer, "slicer.util": slicer.util,
            "slicer.ScriptedLoadableModule": slicer.ScriptedLoadableModule,
            "slicer.parameterNodeWrapper": slicer.parameterNodeWrapper, "vtk": vtk_fake(), "qt": qt_shim()}


def install_fakes(monkeypatch, slicer: types.ModuleType) -> None:
    """Put the fakes in sys.modules (undone after the test) and forget module files imported on other fakes."""
    for name, module in fake_modules(slicer).items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    package = __import__("SSLMedSAM2Lib")
    for name in list(sys.modules):  # fresh imports, on these fakes
        if name == "SSLMedSAM2" or (name.startswith("SSLMedSAM2Lib.") and name.split(".")[1] in SLICER_SIDE):
            monkeypatch.delitem(sys.modules, name)
            monkeypatch.delattr(package, name.split(".")[-1], raising=False)


SLICER_SIDE = ("engine_process", "installer", "install_panel", "scene_io", "study_io", "prediction", "logic",
               "widget", "study_panel", "parameter_node", "testing", "editor", "markers")
