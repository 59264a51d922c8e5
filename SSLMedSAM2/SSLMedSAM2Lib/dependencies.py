"""Which packages Slicer's Python lacks or has in the wrong version, and the steps that install them without breaking
Slicer. No Slicer here: the steps run in installer.py, the dialogs in install_panel.py.

Every check compares the installed version with the specifier of pyproject.toml (requirements.py reads it). Slicer's
own numpy and SimpleITK are never replaced: every pip call gets a constraints file pinning them (and torch, once it
satisfies the engine). torch and torchvision come from light-the-torch, with the arguments the PyTorch extension's
installTorch uses, so that the build matches the GPU; sam2 is built against that torch (--no-build-isolation).

Every button that needs the engine runs through `run_guarded`: before the packages are there it says what is missing
and what to do, in a dialog.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from SSLMedSAM2Lib.requirements import (BUILT_AGAINST_TORCH, CLIENT, ENGINE, SLICER_OWN, TORCH, TORCHVISION,
                                        Environment, Project, local_engine_refusal, needed, project)

CONSTRAINTS = "{constraints}"  # in a step's arguments: the path of the constraints file, written before the step
LIGHT_THE_TORCH = "light-the-torch>=0.5"  # as the PyTorch extension installs it (PyTorchUtils._installLightTheTorch)
INSTALL_HINT = "open 'Models and dependencies' in the SSLMedSAM2 module and press 'Check and install dependencies'"
ENGINE_ONLY_HINT = ("few-shot and the study's nnU-Net run on this computer, in Slicer's own Python (which then needs "
                    "the full engine) or with an engine command: set 'Propagate on' to local, then press 'Check and "
                    "install dependencies' or set 'Engine command' to another Python environment's sslmedsam2")


@dataclass(frozen=True)
class InstallStep:
    """One process: `python -m <module> <arguments>`, CONSTRAINTS replaced by the constraints file's path."""

    title: str
    module: str  # pip or light_the_torch
    arguments: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class InstallPlan:
    need: str  # client or engine
    steps: tuple[InstallStep, ...] = ()
    problems: tuple[str, ...] = ()  # what Install cannot fix, each saying what to do: nothing is installed then
    changes: tuple[str, ...] = ()  # what Install will do, in words
    kept: tuple[str, ...] = ()  # Slicer's own packages, pinned
    restart: tuple[str, ...] = ()  # packages loaded in this session that Install replaces
    absent: tuple[str, ...] = ()  # short: "sam2 (missing)", "nnunetv2 2.5.1 (needs <2.9,>=2.8.1)"

    @property
    def ready(self) -> bool:
        return not self.steps and not self.problems


def constraints_text(environment: Environment, engine: Project | None = None) -> str:
    """Pins of Slicer's own packages, and of torch when it satisfies the engine (read again before every step)."""
    torch = (engine or project()).requirement(TORCH)
    pins = [f"{name}=={environment.version_of(name)}" for name in SLICER_OWN if environment.version_of(name)]
    have = environment.version_of(TORCH)
    if have and torch is not None and torch.specifier.contains(have, prereleases=True):
        pins.append(f"{TORCH}=={have}")
    return "\n".join(pins) + "\n"


def _pip(title: str, requirements: list[str], *options: str, environment=()) -> InstallStep:
    return InstallStep(title, "pip", ("install", *options, "-c", CONSTRAINTS, *requirements), tuple(environment))


def plan_install(need: str = ENGINE, environment: Environment | None = None,
                 engine: Project | None = None) -> InstallPlan:
    """What Slicer's Python lacks for `need` (client or engine) and the steps that install it."""
    environment = environment or Environment.current()
    engine = engine or project()
    version_of = environment.version_of
    problems: list[str] = []
    if not engine.requires_python.contains(environment.python, prereleases=True):
        problems.append(f"Slicer's Python {environment.python} does not satisfy the engine's Python "
                        f"{engine.requires_python}: use 3D Slicer 5.10 or newer.")
    wanted = needed(engine.requirements, need)
    torch = next((r for r in wanted if canonicalize_name(r.name) == TORCH), None)
    if need == ENGINE:
        refusal = local_engine_refusal(environment, torch)
        if refusal:
            return InstallPlan(need, problems=(*problems, refusal))
    changes, kept, restart, built, rest, missing, absent = [], [], [], [], [], [], []
    torch_args: list[str] | None = None
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        have = version_of(requirement.name)
        fits = have is not None and requirement.specifier.contains(have, prereleases=True)
        if name in {canonicalize_name(n) for n in SLICER_OWN}:
            if fits:
                kept.append(f"{requirement.name} {have}")
            else:
                problems.append(f"Slicer's own {requirement.name} {have or '(missing)'} does not satisfy "
                                f"{requirement} and is never replaced (Slicer needs its own): use 3D Slicer 5.10 or "
                                "newer.")
            continue
        if not fits or (name == TORCH and not version_of(TORCHVISION)):
            absent.append(f"{requirement.name} {have} (needs {requirement.specifier})" if have and not fits
                          else f"{requirement.name if not fits else TORCHVISION} (missing)")
        if name == TORCH:
            torch_args = _torch(requirement, have, fits, version_of(TORCHVISION), environment, changes, problems)
            continue
        if fits:
            continue
        if have:
            changes.append(f"replace {requirement.name} {have} with {requirement} (other extensions that use it get "
                           "this version too)")
        else:
            missing.append(str(requirement))
        if have and name in environment.loaded:
            restart.append(requirement.name)
        (built if name in BUILT_AGAINST_TORCH else rest).append(str(requirement))
    if missing:
        changes.append("install " + ", ".join(missing))
    if problems:
        return InstallPlan(need, problems=tuple(problems), kept=tuple(kept), absent=tuple(absent))
    steps = []
    if torch_args is not None:
        if version_of("light-the-torch") is None:
            steps.append(_pip("light-the-torch (the PyTorch extension's installer of torch)", [LIGHT_THE_TORCH]))
        steps.append(InstallStep("torch and torchvision, the build for this computer's GPU (light-the-torch)",
                                 "light_the_torch", ("install", *torch_args, "-c", CONSTRAINTS)))
    if built:  # sam2's optional CUDA extension needs a compiler: SAM2 runs without it
        steps.append(_pip(", ".join(built) + ", built against this torch", built, "--no-build-isolation",
                          environment=[("SAM2_BUILD_CUDA", "0")]))
    if rest:
        steps.append(_pip(", ".join(rest), rest))
    return InstallPlan(need, tuple(steps), (), tuple(changes), tuple(kept), tuple(restart), tuple(absent))


def _torch(requirement: Requirement, have: str | None, fits: bool, vision: str | None, environment: Environment,
           changes: list[str], problems: list[str]) -> list[str] | None:
    """light-the-torch arguments for torch (and torchvision, which sam2 needs, built for the same backend), or None
    when both are there; a torch that must be replaced while it is loaded is a problem (its files are in use)."""
    if fits and vision:
        return None
    if fits:
        changes.append(f"install torchvision for torch {have} (light-the-torch picks the matching build)")
        return [f"{TORCH}=={have}", TORCHVISION]
    if have and TORCH in environment.loaded:
        problems.append(f"torch {have} (installed for another extension) is older than the {requirement} SSLMedSAM2 "
                        "needs, and it is loaded in this Slicer session, so it cannot be replaced now: restart Slicer "
                        "and press 'Check and install dependencies' before using a module that uses torch.")
        return None
    changes.append(f"replace torch {have} with {requirement} and torchvision (other extensions that use torch get "
                   "this version too)" if have else f"install {requirement} and torchvision with light-the-torch, "
                   "the PyTorch extension's installer (it picks the build for this computer's GPU)")
    return [str(requirement), TORCHVISION]


def describe(plan: InstallPlan) -> str:
    """What the confirmation dialog says before anything is installed ("" when nothing is needed)."""
    if plan.problems:
        return "SSLMedSAM2 cannot install its dependencies here:\n" + "\n".join(f"- {p}" for p in plan.problems)
    if not plan.steps:
        return ""
    lines = ["Install will, into Slicer's Python:", *(f"- {change}" for change in plan.changes)]
    if plan.kept:
        lines.append(f"Slicer's own {', '.join(plan.kept)} are kept as they are (pinned).")
    lines.append("It takes a few minutes; pip's output shows below the button, and Slicer stays usable.")
    if plan.restart:
        lines.append(f"Restart Slicer afterwards: this session has already loaded {', '.join(plan.restart)}.")
    return "\n".join(lines)


class MissingDependencies(RuntimeError):
    """The packages a button needs are not (all) in Slicer's Python; the message says what to do."""


def require(need: str = ENGINE, environment: Environment | None = None, engine: Project | None = None,
            engine_choice: str = ENGINE) -> None:
    """Raise MissingDependencies, saying what is missing and what to do, unless `need` is satisfied.
    engine_choice: what the panel's engine setting needs (the Install button installs that)."""
    plan = plan_install(need, environment, engine)
    if plan.ready:
        return
    if plan.problems:
        raise MissingDependencies(" ".join(plan.problems))
    what = ", ".join(plan.absent)
    hint = ENGINE_ONLY_HINT if need == ENGINE and engine_choice == CLIENT else INSTALL_HINT
    raise MissingDependencies(f"SSLMedSAM2 needs Python packages that are missing or not the right version ({what}): "
                              f"{hint}.")


def user_message(error: BaseException) -> str:
    """The dialog's text for an error: a missing package points to the installer instead of a bare import error."""
    if isinstance(error, ModuleNotFoundError) and error.name:
        return f"The Python package {error.name.split('.')[0]} is missing from Slicer's Python: {INSTALL_HINT}."
    return str(error) or type(error).__name__


def run_guarded(title: str, action: Callable[[], object], show_error: Callable[[str, str], None],
                check: Callable[[], None] = require) -> bool:
    """Check the dependencies (`check` raises MissingDependencies), then run a button's action; any failure ends in
    a dialog (show_error(text, details)), never only in the Python console. Returns whether the action ran through."""
    try:
        check()
        action()
    except Exception as error:  # everything the user must see
        show_error(f"{title}\n\n{user_message(error)}", traceback.format_exc())
        return False
    return True


def self_test_skip_reason(environment: Environment | None = None, engine: Project | None = None) -> str | None:
    """Why the self-test cannot propagate with SAM2 here (a dashboard's Slicer has no torch), or None."""
    plan = plan_install(ENGINE, environment, engine)
    if plan.ready:
        return None
    why = " ".join(plan.problems) or ", ".join(plan.absent)
    return f"the engine cannot run in this Slicer's Python ({why})"
