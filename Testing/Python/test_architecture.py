"""The engine's import graph follows the layers docs/architecture.md draws: no import back up, no circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "src" / "sslmedsam2"


def _layers() -> dict[str, int]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    layers = {}
    for height, line in enumerate(block.group(1).strip().splitlines()):
        for package in line.split()[1:]:
            layers[package] = height
    return layers


def _package(module: str) -> str:
    """sslmedsam2.volume.io -> volume; sslmedsam2.jobs -> jobs."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _engine_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("sslmedsam2.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "sslmedsam2":  # from sslmedsam2 import x: the module x
                found |= {f"sslmedsam2.{alias.name}" for alias in node.names if alias.name != "__version__"}
            elif node.module.startswith("sslmedsam2."):
                found.add(node.module)
    return found


def _modules() -> dict[str, Path]:
    return {".".join(("sslmedsam2", *p.relative_to(ENGINE).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in sorted(ENGINE.rglob("*.py"))}


def test_every_package_has_a_layer():
    layers = _layers()
    packages = {_package(m) for m in _modules() if m != "sslmedsam2"}
    assert packages <= set(layers), f"packages without a layer in docs/architecture.md: {sorted(packages - set(layers))}"


def test_no_import_runs_back_up_or_sideways():
    layers = _layers()
    wrong = []
    for module, path in _modules().items():
        if module == "sslmedsam2":
            continue
        here = _package(module)
        for imported in _engine_imports(path):
            there = _package(imported)
            if there != here and there != "__init__" and layers[there] >= layers[here]:
                wrong.append(f"{module} imports {imported} ({here} is not above {there})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_modules():
    modules = _modules()
    graph = {m: {i for i in _engine_imports(p) if i in modules and i != m} for m, p in modules.items()}
    seen, stack, circles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            circles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()

    for module in sorted(graph):
        visit(module)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)
