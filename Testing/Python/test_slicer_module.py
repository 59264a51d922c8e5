"""The Slicer module without Slicer: it compiles, its .ui loads in a real Qt with every widget the code uses,
its parameters bind to widgets that exist, and its CMakeLists lists every file."""

from __future__ import annotations

import os
import py_compile
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SSLMedSAM2"
UI = MODULE / "Resources" / "UI" / "SSLMedSAM2.ui"


def test_every_module_file_compiles(tmp_path):
    for path in MODULE.rglob("*.py"):
        py_compile.compile(str(path), cfile=str(tmp_path / (path.name + "c")), doraise=True)


def test_module_file_is_thin_and_has_the_slicer_classes():
    text = (MODULE / "SSLMedSAM2.py").read_text()
    for cls in ("SSLMedSAM2", "SSLMedSAM2Widget", "SSLMedSAM2Logic", "SSLMedSAM2Test"):
        assert re.search(rf"^class {cls}\(", text, re.M), cls
    assert len(text.splitlines()) < 120


def _used_widget_names() -> set[str]:
    names = set()
    for path in (MODULE / "SSLMedSAM2Lib").glob("*.py"):
        names |= set(re.findall(r"\b(?:self\.)?ui\.(\w+)", path.read_text()))
        names |= set(re.findall(r"\bu\.(\w+)\.connect", path.read_text()))
    return names


@pytest.fixture(scope="module")
def panel():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6")
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from render_ui import load_panel
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    widget = load_panel(UI)
    yield widget
    widget.deleteLater()
    app.processEvents()


def test_ui_loads_with_every_widget_the_code_uses(panel):
    from PySide6.QtWidgets import QWidget

    present = {w.objectName() for w in panel.findChildren(QWidget)}
    used = _used_widget_names()
    assert len(used) > 20  # the scan found the code's widget references
    assert used <= present, f"missing in the .ui: {sorted(used - present)}"


def test_every_parameter_is_bound_to_a_widget_and_back(panel):
    from PySide6.QtWidgets import QWidget

    bound = {w.property("SlicerParameterName") for w in panel.findChildren(QWidget) if w.property("SlicerParameterName")}
    source = (MODULE / "SSLMedSAM2Lib" / "parameter_node.py").read_text()
    fields = set(re.findall(r"^    (\w+): ", source, re.M))
    assert fields == bound


def test_rendering_matches_the_committed_screenshot_size(panel, tmp_path):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from render_ui import render
    from PySide6.QtGui import QImage

    target = tmp_path / "panel.png"
    render(target)
    image, committed = QImage(str(target)), QImage(str(ROOT / "Resources" / "Screenshots" / "module-panel.png"))
    assert not image.isNull() and image.width() == committed.width() and image.height() == committed.height()


def test_cmakelists_list_every_script_and_resource():
    cmake = (MODULE / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "SSLMedSAM2")
    listed = set(re.findall(r"^\s+(\S+\.(?:py|png|ui))\s*$", cmake, re.M))
    scripts = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py")}
    resources = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file()}
    assert listed == scripts | resources
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(SSLMedSAM2)" in top and 'EXTENSION_DEPENDS "PyTorch"' in top


def test_the_build_tree_has_the_engine_beside_the_module(tmp_path):
    """ctest loads the module from ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}, where
    slicerMacroBuildScriptedModule copies it: the engine must be there too, not only in the installed extension."""
    import shutil
    import subprocess
    import sys

    cmake = (MODULE / "CMakeLists.txt").read_text()
    assert "include(${CMAKE_CURRENT_SOURCE_DIR}/CMake/SSLMedSAM2CopyEngine.cmake)" in cmake
    assert re.search(r"sslmedsam2_copy_engine\(\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\./src/sslmedsam2\s+"
                     r"\$\{CMAKE_BINARY_DIR\}/\$\{Slicer_QTSCRIPTEDMODULES_LIB_DIR\}/sslmedsam2\)", cmake)
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the copy itself is not run")
    modules = tmp_path / "lib" / "Slicer-5.10" / "qt-scripted-modules"  # the build tree's module folder
    script = tmp_path / "copy.cmake"
    source, target = (ROOT / "src" / "sslmedsam2").as_posix(), (modules / "sslmedsam2").as_posix()
    script.write_text(f"include({(MODULE / 'CMake' / 'SSLMedSAM2CopyEngine.cmake').as_posix()})\n"
                      f"sslmedsam2_copy_engine({source} {target})\n")
    done = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    shutil.copytree(MODULE / "SSLMedSAM2Lib", modules / "SSLMedSAM2Lib")  # what the build copies of the module
    sys.path.insert(0, str(MODULE))
    from SSLMedSAM2Lib.launch import engine_source

    assert engine_source(modules / "SSLMedSAM2Lib" / "launch.py") == modules.resolve()
    assert sorted(p.name for p in (modules / "sslmedsam2" / "sample").iterdir() if p.suffix == ".gz")
    code = "import sslmedsam2.cli, sslmedsam2.refine.rounds; print(sslmedsam2.__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(modules)})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve().is_relative_to(modules.resolve())
