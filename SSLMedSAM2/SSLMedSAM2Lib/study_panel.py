"""The panel's study section: add cases, the nnU-Net refinement job (followed with a timer), its refined
pseudo-labels, and the study's model on the current volume (predict, then SAM2 from its best slices)."""

from __future__ import annotations

from pathlib import Path

import qt
import slicer

from SSLMedSAM2Lib.requirements import CLIENT

REFINE_POLL_MS = 1000


def _show_error(text: str, details: str) -> None:
    slicer.util.errorDisplay(text, detailedText=details)


class StudyPanel:
    def __init__(self, panel) -> None:
        self.panel = panel  # SSLMedSAM2PanelWidget: ui, logic, parameters, settings, busy state
        self.ui, self.logic = panel.ui, panel.logic
        self._monitor = None
        self._timer = qt.QTimer()
        self._timer.setInterval(REFINE_POLL_MS)
        self._timer.connect("timeout()", self.onPollRefine)
        u = self.ui
        u.addToStudyButton.connect("clicked()", self.onAddToStudy)
        u.refineButton.connect("clicked()", self.onRefine)
        u.cancelRefineButton.connect("clicked()", self.onCancelRefine)
        u.loadRefinedButton.connect("clicked()", self.onLoadRefined)
        u.predictButton.connect("clicked()", self.onPredict)
        u.refineFromKeySlicesButton.connect("clicked()", self.onRefineFromKeySlices)

    def _workspace(self) -> Path | None:
        path = self.panel.parameters.workspace
        if not path or str(path) in ("", "."):
            slicer.util.errorDisplay("Choose a workspace folder first.")
            return None
        return Path(path)

    def stop(self) -> None:
        self._stopFollowing("")

    @property
    def following(self) -> bool:
        """A refinement job is being followed (its Refine button stays off until it ends)."""
        return self._monitor is not None

    # --- the study's model on the current volume ---------------------------------------------------------------
    def onPredict(self) -> None:
        workspace = self._workspace()
        if workspace is None:
            return

        def start() -> None:
            p = self.panel.parameters
            axis = self.logic.study_model.predict(workspace, p.inputVolume, p.segmentation, p.device)
            if p.axis != axis:
                p.axis = axis  # the prediction's confidence table and review are along the workspace's axis
            self.panel.startedRun(f"segmenting with the study's model ({axis} slices)...", self._afterPredict)

        self.panel.install.guarded("SSLMedSAM2 could not start the prediction.", start, _show_error,
                                   self.logic.connection.jobs_need)

    def _afterPredict(self) -> None:
        prediction = self.logic.study_model.prediction
        if prediction is not None and self.panel.parameters.segmentation is not prediction.segmentation:
            self.panel.parameters.segmentation = prediction.segmentation
        self.panel.onLowestConfidence()  # the review starts at the least confident slice

    def onRefineFromKeySlices(self) -> None:
        def start() -> None:
            settings = self.panel.settings()
            if settings is None:
                return
            p = self.panel.parameters
            self.logic.study_model.refine_from_key_slices(p.inputVolume, p.segmentation, settings)
            self.panel.startedRun("choosing the prediction's best slices...", self.panel.onLowestConfidence)

        self.panel.install.guarded("SSLMedSAM2 could not refine from the key slices.", start, _show_error,
                                   self.logic.connection.jobs_need)

    # --- cases and the refinement job --------------------------------------------------------------------------
    def onAddToStudy(self) -> None:
        workspace = self._workspace()
        if workspace is None:
            return

        def add() -> None:
            from SSLMedSAM2Lib.study_io import AlreadyInStudy

            p = self.panel.parameters
            try:
                case = self.logic.add_to_study(workspace, p.inputVolume, p.segmentation, p.axis)
            except AlreadyInStudy as already:
                question = (f"{already.args[0].capitalize()}. Replace its pseudo-label with this segmentation? Its "
                            "review states become this review's (the ones a person set before are dropped).")
                if not slicer.util.confirmYesNoDisplay(question, windowTitle="SSLMedSAM2: add to study"):
                    return
                case = self.logic.add_to_study(workspace, p.inputVolume, p.segmentation, p.axis, replace=True)
                self.ui.refineStatusLabel.setText(f"replaced the pseudo-label of case {case} in {workspace}")
                return
            self.ui.refineStatusLabel.setText(f"added case {case} to {workspace}")

        # writes the workspace only (numpy, SimpleITK): the thin client is enough
        self.panel.install.guarded("SSLMedSAM2 could not add the case to the study.", add, _show_error, CLIENT)

    def onRefine(self) -> None:
        workspace = self._workspace()
        if workspace is None:
            return

        def start() -> None:
            p = self.panel.parameters
            sam2 = None
            if p.sam2FromNnunet:  # SAM2 runs inside the job, on this machine
                sam2 = self.panel.settings(local_job=True)
                if sam2 is None:
                    return
            self.logic.start_refine(workspace, p.rounds, p.quick, p.warmStart, p.device, sam2=sam2)
            self._follow(workspace, fresh=True)

        self.panel.install.guarded("SSLMedSAM2 could not start the refinement.", start, _show_error,
                                   self.logic.connection.jobs_need)

    def reattachRefine(self) -> None:
        """Opening the module (or Slicer) while a job runs: follow it again (its monitor needs the thin client in
        Slicer's Python: without it, the job is not followed here)."""
        path = self.panel.parameters.workspace
        if self._monitor is not None or not path or str(path) in ("", "."):
            return  # already following (entering the module again), or no workspace
        try:
            self.panel.install.check(CLIENT)
        except Exception:  # nothing installed yet: the dialogs say so on a click
            return
        if self.logic.refine_status(Path(path)).get("state") == "running":
            self._follow(Path(path), fresh=False)

    def _follow(self, workspace: Path, fresh: bool) -> None:
        self._monitor = self.logic.refine_monitor(workspace, fresh)
        self.ui.refineButton.enabled, self.ui.cancelRefineButton.enabled = False, True
        self._timer.start()

    def _stopFollowing(self, text: str) -> None:
        self._timer.stop()
        self._monitor = None
        self.ui.refineButton.enabled = self.panel.available("refineButton")
        self.ui.cancelRefineButton.enabled = False
        if text:
            self.ui.refineStatusLabel.setText(text)

    def _logEvents(self, events: list[dict]) -> None:
        for event in events:
            if event["event"] in ("stage", "round", "error", "job"):
                self.ui.refineLog.appendPlainText(f"{event['time']} {event['event']}: "
                                                  + ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "event")))

    def onPollRefine(self) -> None:
        monitor, control = self._monitor, self.logic.refine
        if monitor is None or control is None:
            return
        control.poll()  # a Cancel pressed while the job was still starting reaches it now
        self._logEvents(monitor.poll())
        rounds = (monitor.log.read_status().get("options") or {}).get("rounds", 1)
        self.ui.refineProgressBar.setValue(int(100 * monitor.fraction(rounds)))
        self.ui.refineStatusLabel.setText(monitor.describe() + (f" ({monitor.state})" if monitor.state else ""))
        if monitor.finished:
            self._stopFollowing("")
        elif not control.running():
            self._logEvents(monitor.poll())  # its last events, written just before it let go of its lock
            if monitor.finished:
                self._stopFollowing("")
            else:
                failure = control.failure()
                self._stopFollowing(f"the job failed: {failure}" if failure
                                    else "the job stopped without finishing; press Refine to resume it")

    def onCancelRefine(self) -> None:
        workspace = self._workspace()
        if workspace is not None:
            self.ui.refineStatusLabel.setText(self.logic.cancel_refine(workspace) or "no refinement is running")

    def onLoadRefined(self) -> None:
        workspace = self._workspace()
        if workspace is None:
            return

        def load() -> None:
            volume, segmentation, case, round_name = self.logic.load_refined(workspace)
            self.panel.parameters.inputVolume, self.panel.parameters.segmentation = volume, segmentation
            self.ui.refineStatusLabel.setText(f"loaded {case} from {round_name} for review")

        self.panel.install.guarded("SSLMedSAM2 could not load the refined pseudo-labels.", load, _show_error, CLIENT)
