"""What the engine requires (read from its pyproject.toml: no copies here) and what this computer can run. No Slicer.

Two ways to run the engine need two sets of packages in Slicer's Python:
- `client`: a remote engine, or a local one started from another Python environment (the engine command): the thin
  client only (sslmedsam2.remote and sslmedsam2.session.remote: numpy and requests; the study's workspace: filelock
  for its lock and the refine job's, nibabel for its NIfTI files);
- `engine`: the engine in Slicer's own Python: every requirement of pyproject.toml, torch among them.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from SSLMedSAM2Lib.compatibility import SHIPPED_PYPROJECT, pyproject_path

CLIENT, ENGINE = "client", "engine"
# what the engine modules the module imports whatever the engine need (test_slicer_platform imports them without
# the rest): sslmedsam2.remote and sslmedsam2.session.remote, the workspace, the refine job's events and monitor
CLIENT_PACKAGES = ("numpy", "requests", "filelock", "nibabel")
SLICER_OWN = ("numpy", "SimpleITK")  # bundled with Slicer: never replaced, pinned in every pip call
TORCH, TORCHVISION = "torch", "torchvision"
BUILT_AGAINST_TORCH = ("sam2",)  # built with --no-build-isolation against the torch in Slicer's Python
NEWEST_TORCH_MACOS_X86_64 = "2.2.2"  # PyTorch's last macOS x86_64 wheels (Python 3.12 included)


class RequirementsMissing(RuntimeError):
    """The module's copy of pyproject.toml is missing (a damaged install)."""


def read_pyproject(path: Path | None = None) -> dict:
    path = path or pyproject_path()
    if path is None:
        raise RequirementsMissing(f"the engine's requirements ({SHIPPED_PYPROJECT}, a copy of pyproject.toml) are not "
                                  "beside the module: reinstall the SSLMedSAM2 extension")
    with open(path, "rb") as handle:
        return tomllib.load(handle)


@dataclass(frozen=True)
class Project:
    """pyproject.toml's `requires-python` and `dependencies`."""

    requires_python: SpecifierSet
    requirements: tuple[Requirement, ...]

    def requirement(self, name: str) -> Requirement | None:
        return next((r for r in self.requirements if canonicalize_name(r.name) == canonicalize_name(name)), None)


def project(path: Path | None = None) -> Project:
    """The engine's requirements, from the pyproject.toml that ships with the module (or a given one)."""
    table = read_pyproject(path)["project"]
    return Project(SpecifierSet(table.get("requires-python", "")),
                   tuple(Requirement(text) for text in table["dependencies"]))


def needed(requirements: tuple[Requirement, ...], need: str) -> list[Requirement]:
    """The requirements a way of running the engine needs (markers evaluated for this Python)."""
    applicable = [r for r in requirements if r.marker is None or r.marker.evaluate()]
    if need == CLIENT:
        client = {canonicalize_name(name) for name in CLIENT_PACKAGES}
        return [r for r in applicable if canonicalize_name(r.name) in client]
    return applicable


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def loaded_distributions() -> frozenset[str]:
    """Distributions (canonical names) whose modules this Python has imported: replacing them needs a restart."""
    mapping = importlib.metadata.packages_distributions()
    tops = {name.split(".")[0] for name in list(sys.modules)}
    return frozenset(canonicalize_name(dist) for top in tops for dist in mapping.get(top, ()))


def under_rosetta() -> bool:
    """An x86_64 process on Apple Silicon (macOS says so in sysctl.proc_translated); False elsewhere."""
    if sys.platform != "darwin":
        return False
    try:
        done = subprocess.run(["sysctl", "-n", "sysctl.proc_translated"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.stdout.strip() == "1"


@dataclass(frozen=True)
class Environment:
    """What a plan is made from: installed versions, platform, Python and what is already imported. Tests make
    their own; `current()` is Slicer's."""

    version_of: Callable[[str], str | None] = installed_version
    system: str = field(default_factory=platform.system)
    machine: str = field(default_factory=platform.machine)
    python: str = field(default_factory=platform.python_version)
    rosetta: bool = False
    loaded: frozenset[str] = frozenset()

    @classmethod
    def current(cls) -> "Environment":
        importlib.invalidate_caches()  # packages a finished install added
        return cls(installed_version, platform.system(), platform.machine(), platform.python_version(),
                   under_rosetta(), loaded_distributions())

    @property
    def macos_x86_64(self) -> bool:
        return self.system == "Darwin" and self.machine in ("x86_64", "AMD64", "i386")


def local_engine_refusal(environment: Environment, torch: Requirement | None) -> str | None:
    """Why the engine cannot run in Slicer's own Python on this platform (one message saying what works), or None."""
    if not environment.macos_x86_64:
        return None
    if torch is not None and torch.specifier.contains(NEWEST_TORCH_MACOS_X86_64):
        return None  # a future engine content with an older torch
    spec = str(torch.specifier) if torch is not None else ""
    where = " (under Rosetta on this Apple Silicon Mac)" if environment.rosetta else ""
    native = ("on Apple Silicon it uses the GPU (device mps)" if environment.rosetta
              else "it runs on this Mac's CPU")
    return (f"The local engine cannot run inside Slicer on this Mac: Slicer for macOS runs as an x86_64 "
            f"program{where}, the newest torch for macOS x86_64 is {NEWEST_TORCH_MACOS_X86_64}, and SAM2 needs torch"
            f"{spec}. Two ways work: a remote engine (`sslmedsam2 serve` on a GPU machine, reached through an SSH "
            f"tunnel: set 'Propagate on' to remote), or an engine installed in a native Python environment on this "
            f"Mac (`pip install` the sslmedsam2 package there; {native}): set 'Engine command' in the Engine section "
            f"to that environment's sslmedsam2 and the module starts it on 127.0.0.1 with a token. Few-shot and the "
            f"study's nnU-Net run on this Mac only with that engine command.")
