"""Whether this Slicer can run the module at all, decided when the module loads. No Slicer here.

This file must load in every Slicer that may find the module, Slicer 5.8 (Python 3.9) included, so that an old
Slicer gets one message instead of a traceback: Python 3.9 syntax only, the standard library only (`packaging` when
present), and no import of the engine. It also finds the copy of the engine's pyproject.toml that ships with the
module: the one source of every requirement (requires-python here, the packages in requirements.py).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional, Tuple

CONTRIBUTORS = "SSLMedSAM2 developers"  # CMakeLists.txt: EXTENSION_CONTRIBUTORS (a test keeps both equal)
MINIMUM_SLICER = (5, 10)  # CMakeLists.txt: SSLMedSAM2_MINIMUM_SLICER_VERSION (a test keeps both equal)
# The copy of pyproject.toml beside the engine package in a build tree or an installed extension (CMakeLists.txt)
SHIPPED_PYPROJECT = "sslmedsam2-pyproject.toml"
FALLBACK_REQUIRES_PYTHON = ">=3.11"  # only when no pyproject.toml is found (a damaged install): said so elsewhere


def pyproject_path(module_file: str = __file__) -> Optional[Path]:
    """The engine's pyproject.toml: the shipped copy beside the module's folder (build tree, installed extension),
    else the source checkout's own (SSLMedSAM2/SSLMedSAM2Lib/ -> ../../pyproject.toml)."""
    here = Path(module_file).resolve()
    for candidate in (here.parents[1] / SHIPPED_PYPROJECT, here.parents[2] / "pyproject.toml"):
        if candidate.is_file():
            return candidate
    return None


def requires_python(path: Optional[Path] = None) -> str:
    """`requires-python` of the engine's pyproject.toml, read without tomllib (Python 3.11+ only)."""
    path = path or pyproject_path()
    if path is None:
        return FALLBACK_REQUIRES_PYTHON
    found = re.search(r'^requires-python\s*=\s*"([^"]+)"', path.read_text(encoding="utf-8"), re.M)
    return found.group(1) if found else FALLBACK_REQUIRES_PYTHON


def python_satisfies(specifier: str, version: str) -> bool:
    """Whether a Python version satisfies a specifier ("3.9.10", ">=3.11"); packaging when Slicer has it (5.8 does),
    else the `>=X.Y` form pyproject.toml uses."""
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(specifier).contains(version, prereleases=True)
    except ImportError:
        found = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", specifier)
        wanted = (int(found.group(1)), int(found.group(2))) if found else (3, 11)
        return tuple(int(part) for part in version.split(".")[:2]) >= wanted


def unsupported_reason(slicer_version: Tuple[int, int], python_version: Optional[str] = None,
                       pyproject: Optional[Path] = None) -> Optional[str]:
    """One message when this Slicer cannot run the module (too old, or its Python older than the engine's
    requires-python), else None. Nothing gets installed in that case."""
    python_version = python_version or ".".join(str(part) for part in sys.version_info[:3])
    needed = requires_python(pyproject)
    old_slicer = tuple(slicer_version) < MINIMUM_SLICER
    old_python = not python_satisfies(needed, python_version)
    if not (old_slicer or old_python):
        return None
    minimum = ".".join(str(part) for part in MINIMUM_SLICER)
    return (f"SSLMedSAM2 needs 3D Slicer {minimum} or newer: its engine needs Python {needed}, and this is Slicer "
            f"{slicer_version[0]}.{slicer_version[1]} with Python {python_version}. Install Slicer {minimum} or newer "
            "(download.slicer.org) and add SSLMedSAM2 there; nothing was installed into this Slicer.")
