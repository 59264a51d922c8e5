"""The engine must import and run without 3D Slicer: no slicer, qt, ctk or vtk anywhere in it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sslmedsam2

FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "SSLMedSAM2Lib", "PythonQt"}
ENGINE = Path(sslmedsam2.__file__).parent


def test_no_source_file_imports_slicer_modules():
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


def test_importing_every_engine_module_loads_none_of_them():
    modules = sorted(".".join(p.relative_to(ENGINE.parent).with_suffix("").parts)
                     for p in ENGINE.rglob("*.py") if p.name != "__main__.py")
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules) + \
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
