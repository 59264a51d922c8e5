"""Which Python packages the engine needs in Slicer's Python, and how to install them without breaking Slicer.

torch comes from Slicer's PyTorch extension; sam2 is built against that torch (--no-build-isolation); every pip
call carries constraints that pin the numpy, SimpleITK and torch Slicer already has, so pip can never replace
them. Installs run on the main thread (pip_install from a worker thread crashes Slicer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

# The engine's requirements (pyproject.toml), minus torch, which the PyTorch extension provides.
REQUIREMENTS = {
    "sam2": "sam2==1.1.0",
    "scipy": "scipy>=1.10",
    "itk-morphologicalcontourinterpolation": "itk-morphologicalcontourinterpolation>=1.1",
    "pooch": "pooch>=1.8",
    "tqdm": "tqdm>=4.66",
    "matplotlib": "matplotlib>=3.7",
    "nnunetv2": "nnunetv2>=2.8.1,<2.9",
}
PROTECTED = ("numpy", "SimpleITK", "torch")  # Slicer's own (or the PyTorch extension's): never replaced
NEEDS_TORCH_AT_BUILD = ("sam2",)


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class InstallPlan:
    missing: list[str]  # requirement strings to install
    constraints: str  # pip constraints-file text
    torch_missing: bool

    @property
    def needed(self) -> bool:
        return bool(self.missing) or self.torch_missing

    def pip_calls(self, constraints_path: str) -> list[list[str]]:
        """pip argument lists, in order: packages built against torch first, each with the constraints."""
        calls = []
        for requirement in self.missing:
            extra = ["--no-build-isolation"] if requirement.split("=")[0].split(">")[0] in NEEDS_TORCH_AT_BUILD else []
            calls.append(["install", *extra, "-c", constraints_path, requirement])
        return sorted(calls, key=lambda call: "--no-build-isolation" not in call)


def plan_install(version_of: Callable[[str], str | None] = installed_version) -> InstallPlan:
    missing = [req for dist, req in REQUIREMENTS.items() if version_of(dist) is None]
    pins = [f"{name}=={version_of(name)}" for name in PROTECTED if version_of(name) is not None]
    return InstallPlan(missing, "\n".join(pins) + "\n", version_of("torch") is None)


def describe(plan: InstallPlan) -> str:
    """What the confirmation dialog says before anything is installed."""
    lines = []
    if plan.torch_missing:
        lines.append("PyTorch is not installed: install it with the PyTorch extension (PyTorch Utils module) first.")
    if plan.missing:
        lines.append("These Python packages will be installed into Slicer's Python: " + ", ".join(plan.missing) + ".")
        lines.append("Slicer's own " + ", ".join(PROTECTED) + " are kept as they are.")
    return "\n".join(lines)
