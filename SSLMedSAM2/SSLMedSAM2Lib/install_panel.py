"""The panel's dependency section: what the chosen engine needs, the install (in the background, pip's lines in the
panel, the engine buttons off meanwhile), its failure with pip's output, and the check every engine button runs.

Slicer is reached through `dialogs` (slicer.util's confirmOkCancelDisplay, errorDisplay, restart: widget.py gives
them), so that the section is tested headless.
"""

from __future__ import annotations

from collections.abc import Callable

from SSLMedSAM2Lib.dependencies import (MissingDependencies, constraints_text, describe, plan_install, require,
                                        run_guarded)
from SSLMedSAM2Lib.installer import InstallRunner
from SSLMedSAM2Lib.requirements import CLIENT, Environment
from SSLMedSAM2Lib.temporary import TEMPORARY

# What an install turns off, besides the Install button itself (and what a run turns off, see widget._setBusy)
ENGINE_BUTTONS = ("propagateButton", "repropagateButton", "exactButton", "runFewShotButton", "predictButton",
                  "refineFromKeySlicesButton", "refineButton", "addToStudyButton", "loadRefinedButton")
LOG_LINES = 5000
INSTALLING = "The dependencies are being installed: wait until the installation in 'Models and dependencies' ends."


class InstallPanel:
    def __init__(self, ui, dialogs, need: Callable[[], str], busy: Callable[[], bool] = lambda: False,
                 runner: InstallRunner | None = None,
                 environment: Callable[[], Environment] = Environment.current,
                 available: Callable[[str], bool] = lambda name: True) -> None:
        """need(): what the panel's engine choice needs (client or engine); busy(): a run is under way;
        available(button name): whether what the button does can run here (the install turns on no other)."""
        self.ui, self.dialogs, self._need, self._busy, self._available = ui, dialogs, need, busy, available
        self._environment = environment
        self.runner = runner or InstallRunner()
        self.runner.line.connect(self._onLine)
        self.runner.step.connect(self._onStep)
        self.runner.finished.connect(self._onFinished)
        self._folder = None
        self._plan = None
        self._disabled: list[str] = []  # the buttons the install turned off (it turns them on again, no others)
        ui.installButton.connect("clicked()", self.onInstall)
        self.ui.installLog.setMaximumBlockCount(LOG_LINES)

    @property
    def installing(self) -> bool:
        return self.runner.running

    # --- the check every engine button runs --------------------------------------------------------------------
    def check(self, need: str | None = None) -> None:
        """Raise MissingDependencies (a sentence saying what to do) unless `need` (default: the engine choice's) is
        installed and no installation runs."""
        if self.installing:
            raise MissingDependencies(INSTALLING)
        require(need or self._need(), self._environment(), engine_choice=self._need())

    def guarded(self, title: str, action: Callable[[], object], show_error: Callable[[str, str], None],
                need: str | None = None) -> bool:
        """run_guarded with this panel's check: `need` ENGINE for what runs in Slicer's Python whatever the engine."""
        return run_guarded(title, action, show_error, lambda: self.check(need))

    # --- the install -----------------------------------------------------------------------------------------
    def onInstall(self) -> None:
        if self.installing:
            return
        if self._busy():
            self.dialogs.errorDisplay("Wait until the current run ends (or cancel it), then install the dependencies.")
            return
        need = self._need()
        try:
            plan = plan_install(need, self._environment())
        except Exception as exc:  # the module's copy of pyproject.toml is missing, say
            self.dialogs.errorDisplay(f"SSLMedSAM2 cannot check its dependencies: {exc}")
            return
        what = "the thin client (remote engine or engine command)" if need == CLIENT else "the engine"
        if plan.ready:
            self.ui.dependencyStatusLabel.setText(f"Everything {what} needs is installed, in the right versions.")
            return
        text = describe(plan)
        if plan.problems:
            self.ui.dependencyStatusLabel.setText(text)
            self.dialogs.errorDisplay(text)
            return
        if not self.dialogs.confirmOkCancelDisplay(text, "SSLMedSAM2: install dependencies"):
            return
        self._plan = plan
        self._folder = TEMPORARY.make("SSLMedSAM2-pip-")
        self.ui.installLog.clear()
        self.ui.installLog.visible = True
        self._setInstalling(True)
        try:
            self.runner.start(list(plan.steps), lambda: constraints_text(self._environment()), self._folder)
        except Exception:
            self._cleanUp()
            raise

    def _setInstalling(self, installing: bool) -> None:
        """Install and every engine button off while pip runs (a second pip must never start meanwhile); at the
        end the ones it turned off come back."""
        self.ui.installButton.enabled = not installing
        if installing:
            self._disabled = [name for name in ENGINE_BUTTONS if getattr(self.ui, name).enabled]
        for name in self._disabled:
            getattr(self.ui, name).enabled = not installing and self._available(name)
        if not installing:
            self._disabled = []

    def _onLine(self, text: str) -> None:
        self.ui.installLog.appendPlainText(text)

    def _onStep(self, index: int, count: int, title: str) -> None:
        self.ui.dependencyStatusLabel.setText(f"Installing, step {index} of {count}: {title}...")

    def _cleanUp(self) -> None:
        TEMPORARY.remove(self._folder)
        self._folder = None
        self._setInstalling(False)

    def _onFinished(self, error: str, output: str) -> None:
        plan, self._plan = self._plan, None
        self._cleanUp()
        if error:
            self.ui.dependencyStatusLabel.setText(f"The installation failed: {error}")
            self.dialogs.errorDisplay(f"Installing the dependencies failed: {error}\n\npip's output is in the details "
                                      "and in the panel; the packages installed before the failure stay.",
                                      detailedText=output)
            return
        after = plan_install(plan.need if plan is not None else self._need(), self._environment())
        if not after.ready:
            text = describe(after) or "some packages are still missing"
            self.ui.dependencyStatusLabel.setText(f"Installed, but not everything: {text}")
            self.dialogs.errorDisplay(f"The installation ended, but not everything is there:\n{text}",
                                      detailedText=output)
            return
        restart = plan is not None and plan.restart
        self.ui.dependencyStatusLabel.setText("Dependencies installed." + (" Restart Slicer to use them." if restart
                                                                           else ""))
        if restart and self.dialogs.confirmOkCancelDisplay(
                f"Dependencies installed. This Slicer session had already loaded {', '.join(plan.restart)}: restart "
                "Slicer now to use the new versions?", "SSLMedSAM2: restart Slicer"):
            self.dialogs.restart()
