"""Which Python packages the engine needs in Slicer's Python, and how to install them without breaking Slicer.

torch comes from Slicer's PyTorch extension; sam2 is built against that torch (--no-build-isolation); every pip
call carries constraints that pin the numpy, SimpleITK and torch Slicer already has, so pip can never replace
them. Installs run on the main thread (pip_install from a worker thread crashes Slicer).

Every button that needs the engine runs through `run_guarded`: before the packages are installed it says so in a
dialog (building the settings already imports the engine, which imports pooch, which Slicer does not bundle).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

# The engine's requirements (pyproject.toml), minus torch, which the PyTorch extension provides.
REQUIREMENTS = {
    "sam2": "sam2==1.1.0",
    "scipy": "scipy>=1.10",
    "itk-morphologicalcontourinterpolation": "itk-morphologicalcontourinterpolation>=1.1",
    "pooch": "pooch>=1.8",
    "filelock": "filelock>=3.12",
    "nibabel": "nibabel>=5.0",
    "pydicom": "pydicom>=2.4",
    "isal": "isal>=1.6",  # faster gzip reading of NIfTI files (the engine falls back to zlib without it)
    "tqdm": "tqdm>=4.66",
    "matplotlib": "matplotlib>=3.7",
    "nnunetv2": "nnunetv2>=2.8.1,<2.9",
    "fastapi": "fastapi>=0.110",  # the engine server (sslmedsam2 serve) that Propagate goes through
    "pydantic": "pydantic>=2",
    "uvicorn": "uvicorn>=0.29",
    "requests": "requests>=2.31",  # its client (Slicer usually bundles it)
}
PROTECTED = ("numpy", "SimpleITK", "torch")  # Slicer's own (or the PyTorch extension's): never replaced
NEEDS_TORCH_AT_BUILD = ("sam2",)
# Import names of the packages above, where they differ from the distribution's name
IMPORT_NAMES = {"itk": "itk-morphologicalcontourinterpolation", "torch": "torch"}
INSTALL_HINT = ("open 'Models and dependencies' in the SSLMedSAM2 module and press 'Check and install "
                "dependencies'")


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


class MissingDependencies(RuntimeError):
    """The engine's packages are not (all) in Slicer's Python yet; the message says how to install them."""


def require_dependencies(version_of: Callable[[str], str | None] = installed_version) -> None:
    """Raise MissingDependencies, naming what is missing, unless every package the engine needs is installed."""
    plan = plan_install(version_of)
    if not plan.needed:
        return
    missing = (["torch (the PyTorch extension)"] if plan.torch_missing else []) + [
        requirement.split("=")[0].split(">")[0].split("<")[0] for requirement in plan.missing]
    raise MissingDependencies(f"SSLMedSAM2 needs Python packages that are not installed yet ({', '.join(missing)}): "
                              f"{INSTALL_HINT}.")


def user_message(error: BaseException) -> str:
    """The dialog's text for an error: a missing package points to the installer instead of a bare import error."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        top = error.name.split(".")[0]
        if top in REQUIREMENTS or top in IMPORT_NAMES or top == "sslmedsam2":
            return f"The Python package {top} is missing from Slicer's Python: {INSTALL_HINT}."
    return str(error) or type(error).__name__


def run_guarded(title: str, action: Callable[[], object], show_error: Callable[[str, str], None],
                version_of: Callable[[str], str | None] = installed_version) -> bool:
    """Run a button's action after checking the dependencies; any failure ends in a dialog (show_error(text,
    details)), never only in the Python console. Returns whether the action ran through."""
    try:
        require_dependencies(version_of)
        action()
    except Exception as error:  # everything the user must see
        show_error(f"{title}\n\n{user_message(error)}", traceback.format_exc())
        return False
    return True


def self_test_skip_reason(version_of: Callable[[str], str | None] = installed_version) -> str | None:
    """Why the self-test cannot run SAM2 here (a dashboard's Slicer has neither torch nor sam2), or None."""
    absent = [name for name in ("torch", "sam2", "fastapi", "uvicorn", "requests") if version_of(name) is None]
    if not absent:
        return None
    return (f"{', '.join(absent)} not installed in this Slicer: the SAM2 propagation part of the self-test is "
            f"skipped (install the PyTorch extension, then the module's dependencies, to run it)")
