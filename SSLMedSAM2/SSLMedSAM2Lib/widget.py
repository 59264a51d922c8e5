"""The panel: binds the .ui to the parameter node and the logic; nothing here computes.

Scene close: the parameter node, the embedded editor and the review marker let go at its start and come back at
its end (as Slicer's module template and Segment Editor module do).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from SSLMedSAM2Lib import scene_io
from SSLMedSAM2Lib.dependencies import run_guarded
from SSLMedSAM2Lib.editor import EmbeddedEditor
from SSLMedSAM2Lib.logic import SSLMedSAM2Logic
from SSLMedSAM2Lib.parameter_node import SSLMedSAM2ParameterNode

SHORTCUTS = {"Alt+A": "onAccept", "Alt+R": "onReject", "Alt+N": "onNextUnreviewed", "Alt+P": "onPreviousUnreviewed",
             "Alt+L": "onLowestConfidence"}
REFINE_POLL_MS = 1000


def _show_error(text: str, details: str) -> None:
    slicer.util.errorDisplay(text, detailedText=details)


class SSLMedSAM2PanelWidget(VTKObservationMixin):
    def __init__(self, ui, layout, parameter_node: Callable[[], SSLMedSAM2ParameterNode]) -> None:
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.logic = SSLMedSAM2Logic()
        self.parameters: SSLMedSAM2ParameterNode | None = None
        self._parameter_node = parameter_node
        self._gui_tag = None
        self._entered = False
        self._shortcuts: list = []
        self._importing = False
        self._monitor = None
        self._timer = qt.QTimer()
        self._timer.setInterval(REFINE_POLL_MS)
        self._timer.connect("timeout()", self.onPollRefine)
        self.logic.process.progress.connect(self.onProgress)
        self.logic.process.message.connect(lambda line: self.ui.statusLabel.setText(line))
        self.logic.runFinished.connect(self.onRunFinished)
        self.logic.reviewChanged.connect(self.updateReview)
        u = ui
        u.propagateButton.connect("clicked()", self.onPropagate)
        u.cancelButton.connect("clicked()", self.logic.cancel)
        u.repropagateButton.connect("clicked()", self.onRepropagate)
        u.acceptButton.connect("clicked()", self.onAccept)
        u.rejectButton.connect("clicked()", self.onReject)
        u.undoButton.connect("clicked()", self.onUndo)
        u.nextUnreviewedButton.connect("clicked()", self.onNextUnreviewed)
        u.previousUnreviewedButton.connect("clicked()", self.onPreviousUnreviewed)
        u.lowestConfidenceButton.connect("clicked()", self.onLowestConfidence)
        u.sliceTable.connect("cellDoubleClicked(int,int)", lambda row, column: self.jumpTo(int(u.sliceTable.item(row, 0).text())))
        u.runFewShotButton.connect("clicked()", self.onRunFewShot)
        u.addToStudyButton.connect("clicked()", self.onAddToStudy)
        u.refineButton.connect("clicked()", self.onRefine)
        u.cancelRefineButton.connect("clicked()", self.onCancelRefine)
        u.loadRefinedButton.connect("clicked()", self.onLoadRefined)
        u.installButton.connect("clicked()", self.onInstall)
        self._inputs = (None, None)
        self._fewShot = ""
        self.editor = EmbeddedEditor(ui.segmentEditorWidget, slicer.mrmlScene,
                                     later=lambda call: qt.QTimer.singleShot(0, call))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

    # --- life cycle ------------------------------------------------------------------------------------------
    def setParameterNode(self, node: SSLMedSAM2ParameterNode | None) -> None:
        if self.parameters is not None:
            if self._gui_tag is not None:
                self.parameters.disconnectGui(self._gui_tag)
                self._gui_tag = None
            self.removeObserver(self.parameters.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self.parameters = node
        if node is None:  # the scene is closing: its nodes are about to be reset
            self._inputs = (None, None)
            return
        self._gui_tag = node.connectGui(self.ui)
        # read inputs from the parameter node once it has changed, never from a selector's signal (order of slots)
        self.addObserver(node.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self.onParameterChanged()
        self.reattachRefine()

    def onParameterChanged(self, *_) -> None:
        if self.parameters is None:
            return
        inputs = (self.parameters.inputVolume, self.parameters.segmentation)
        if inputs != self._inputs:
            self._inputs = inputs
            self.onSegmentationChanged()

    def onSceneStartClose(self, *_) -> None:
        """Everything that refers to the scene's nodes lets go: the run, the review, its marker, the editor."""
        self.logic.cancel()
        self.logic.review = None
        self.updateReview()
        self._stopFollowing("")
        self.removeObservers(self.onSegmentEdited)
        self.editor.scene_start_close()
        self.setParameterNode(None)

    def onSceneEndClose(self, *_) -> None:
        self.editor.scene_end_close(self._entered)
        if self._entered:
            self.setParameterNode(self._parameter_node())

    def onSceneEndImport(self, *_) -> None:
        """A loaded scene may bring its own module editor node and inputs: bind them again."""
        self.editor.scene_end_close(self._entered)
        self._inputs = (None, None)
        self.onParameterChanged()

    def enter(self) -> None:
        self._entered = True
        self.editor.select_node()
        if slicer.app.layoutManager() is not None:
            for axis in scene_io.VIEW_OF_AXIS:  # the marker follows scrolling in any of the three views
                self.addObserver(scene_io.slice_logic(axis).GetSliceNode(), vtk.vtkCommand.ModifiedEvent, self.onSliceMoved)
        self.showMarker()
        main = slicer.util.mainWindow()
        if main is None:  # Slicer without a main window (tests, batch): no shortcuts
            return
        for key, method in SHORTCUTS.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), main)
            shortcut.connect("activated()", getattr(self, method))
            self._shortcuts.append(shortcut)

    def exit(self) -> None:
        self._entered = False
        self.removeObservers(self.onSliceMoved)
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
        self._shortcuts = []
        self.editor.exit()
        scene_io.hide_markers()  # no marker left behind, frozen, in another module

    def cleanup(self) -> None:
        self.exit()
        self._timer.stop()
        self.logic.cancel()
        self.removeObservers()
        if self.parameters is not None and self._gui_tag is not None:
            self.parameters.disconnectGui(self._gui_tag)

    # --- inputs ----------------------------------------------------------------------------------------------
    def onSegmentationChanged(self) -> None:
        self.removeObservers(self.onSegmentEdited)
        volume, segmentation = self.parameters.inputVolume, self.parameters.segmentation
        self.editor.show(segmentation, volume)  # the editor paints exactly what Propagate reads
        if segmentation is not None:
            # voxel edits fire SourceRepresentationModified (SegmentModified is for names and tags)
            self.addObserver(segmentation, slicer.vtkSegmentation.SourceRepresentationModified, self.onSegmentEdited)
        self.updateSeedSlices()

    def updateSeedSlices(self) -> None:
        if self.parameters is None:  # a run that ends while the scene closes
            return
        volume, segmentation = self.parameters.inputVolume, self.parameters.segmentation
        if volume is None or segmentation is None or not scene_io.segment_ids(segmentation):
            self.ui.seedSlicesLabel.setText("choose a volume and a segmentation; draw a few slices of each segment")
            return
        import numpy as np

        axis = scene_io.array_axis(volume, self.parameters.axis)
        lines = []
        for sid, array in scene_io.snapshot(segmentation, volume).items():
            drawn = np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != axis)))
            name = segmentation.GetSegmentation().GetSegment(sid).GetName()
            lines.append(f"{name}: {', '.join(map(str, drawn[:12]))}{' ...' if len(drawn) > 12 else ''}" if len(drawn) else f"{name}: none")
        self.ui.seedSlicesLabel.setText("\n".join(lines))

    def onSegmentEdited(self, caller, event) -> None:
        """A person painted: the slice in view becomes an edited slice (a new prompt)."""
        if self._importing or self.logic.review is None or self.logic.process.running:
            return
        z = scene_io.current_slice(self.parameters.axis, self.parameters.inputVolume)
        if z is not None and z < len(self.logic.review.states) and self.logic.review.edited(z):
            self.updateReview()

    # --- propagation -----------------------------------------------------------------------------------------
    def _settings(self):
        settings = self.parameters.engine_settings()
        question = self.logic.weights_to_download(settings)
        if question:
            if not slicer.util.confirmOkCancelDisplay(question, "SSLMedSAM2: download model weights"):
                return None
            settings.allow_download = True
        return settings

    def _start(self, prompt_slices=None) -> None:
        def start() -> None:
            settings = self._settings()  # imports the engine: inside the guard, after the dependency check
            if settings is None:
                return
            if prompt_slices is None:
                self.logic.review = None  # a fresh propagation: a new review
            self.logic.propagate(self.parameters.inputVolume, self.parameters.segmentation, settings, prompt_slices)
            self._importing = True  # our own import of the result is not a person's edit
            self._setBusy(True, "propagating...")

        run_guarded("SSLMedSAM2 could not start the propagation.", start, _show_error)

    def onPropagate(self) -> None:
        self._start()

    def onRepropagate(self) -> None:
        if self.logic.review is None:
            slicer.util.errorDisplay("Propagate first; re-propagation starts from the reviewed slices.")
            return
        self._start(self.logic.review.prompt_slices())

    def onProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.setMaximum(max(total, 1))
        self.ui.progressBar.setValue(done)

    def onRunFinished(self, error: str) -> None:
        self._importing = False
        self._setBusy(False, "cancelled" if error == "cancelled" else error or "done: review the slices below")
        if error and error != "cancelled":
            slicer.util.errorDisplay(f"SSLMedSAM2: {error}")
        elif not error and self.logic.review is None:
            self._loadFewShotResult()
        self.updateSeedSlices()

    def _setBusy(self, busy: bool, text: str) -> None:
        for button in (self.ui.propagateButton, self.ui.repropagateButton, self.ui.runFewShotButton):
            button.enabled = not busy
        self.ui.cancelButton.enabled = busy
        self.ui.statusLabel.setText(text)
        if busy:
            self.ui.progressBar.setValue(0)

    # --- review ----------------------------------------------------------------------------------------------
    def updateReview(self) -> None:
        review = self.logic.review
        table = self.ui.sliceTable
        if review is None:
            table.setRowCount(0)
            self.ui.reviewSummaryLabel.setText("Nothing to review yet")
            scene_io.hide_markers()
            return
        counts = review.counts()
        self.ui.reviewSummaryLabel.setText(", ".join(f"{v} {k}" for k, v in counts.items() if v))
        table.setRowCount(len(review.states))
        for z, (state, confidence) in enumerate(zip(review.states, review.confidence)):
            for column, text in enumerate((str(z), state.value, "" if confidence != confidence else f"{confidence:.3f}")):
                table.setItem(z, column, qt.QTableWidgetItem(text))
        self.ui.undoButton.enabled = review.can_undo
        self.showMarker()

    def showMarker(self, z: int | None = None) -> None:
        review = self.logic.review
        if review is None or self.parameters is None or self.parameters.inputVolume is None \
                or slicer.app.layoutManager() is None:
            return
        z = scene_io.current_slice(self.parameters.axis, self.parameters.inputVolume) if z is None else z
        if z is None or not 0 <= z < len(review.states):
            return
        confidence = review.confidence[z]
        scene_io.show_marker(self.parameters.axis, f"SSLMedSAM2 slice {z}: {review.states[z].value}"
                             + ("" if confidence != confidence else f" (confidence {confidence:.2f})"))

    def onSliceMoved(self, *_) -> None:
        if self.parameters is not None and self.parameters.inputVolume is not None:
            self.showMarker()

    def jumpTo(self, z: int | None) -> None:
        if z is None:
            self.ui.statusLabel.setText("no unreviewed slice left")
            return
        scene_io.jump_to_slice(self.parameters.axis, self.parameters.inputVolume, z)
        self.ui.sliceTable.selectRow(z)
        self.showMarker(z)

    def _here(self) -> int | None:
        return scene_io.current_slice(self.parameters.axis, self.parameters.inputVolume)

    def onAccept(self) -> None:
        if self.logic.review is not None and self._here() is not None:
            self.logic.review.accept(self._here())
            self.updateReview()
            self.jumpTo(self.logic.review.next_unreviewed(self._here()))

    def onReject(self) -> None:
        if self.logic.review is not None and self._here() is not None:
            self.logic.review.reject(self._here())
            self.updateReview()
            self.jumpTo(self.logic.review.next_unreviewed(self._here()))

    def onNextUnreviewed(self) -> None:
        if self.logic.review is not None:
            self.jumpTo(self.logic.review.next_unreviewed(self._here() or 0))

    def onPreviousUnreviewed(self) -> None:
        if self.logic.review is not None:
            self.jumpTo(self.logic.review.next_unreviewed(self._here() or 0, step=-1))

    def onLowestConfidence(self) -> None:
        if self.logic.review is not None:
            order = self.logic.review.review_order()
            self.jumpTo(order[0] if order else None)

    def onUndo(self) -> None:
        if self.logic.review is not None and self.logic.review.can_undo:
            self._importing = True
            try:
                self.logic.undo(self.parameters.inputVolume, self.parameters.segmentation)
            finally:
                self._importing = False

    # --- few-shot --------------------------------------------------------------------------------------------
    def onRunFewShot(self) -> None:
        def start() -> None:
            p = self.parameters
            settings = self._settings()
            if settings is None:
                return
            self.logic.review = None
            self._fewShot = self.logic.run_few_shot(
                settings, str(p.supportImages), str(p.supportLabels), str(p.queryImages), str(p.fewShotOutput),
                p.insertions, p.supports, self.ui.supportSegmentationsSelector.checkedNodes(),
                self.ui.queryVolumesSelector.checkedNodes())
            self._setBusy(True, "few-shot pseudo-labels...")

        run_guarded("SSLMedSAM2 could not start the few-shot run.", start, _show_error)

    def _loadFewShotResult(self) -> None:
        output = Path(self._fewShot)
        name = self.logic.least_trustworthy(output)
        if name is None:
            return
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        queries = self.parameters.queryImages
        image = Path(queries) / name if queries and str(queries) != "." else Path(name)  # a scene node otherwise
        volume, segmentation = self.logic.load_pseudo_label(image, output / name, output / f"{stem}.confidence.csv")
        self.parameters.inputVolume, self.parameters.segmentation = volume, segmentation
        self.ui.statusLabel.setText(f"loaded {name}, the least trustworthy query (see ranking.csv for the others)")

    # --- study and refinement --------------------------------------------------------------------------------
    def _workspace(self) -> Path | None:
        path = self.parameters.workspace
        if not path or str(path) in ("", "."):
            slicer.util.errorDisplay("Choose a workspace folder first.")
            return None
        return Path(path)

    def onAddToStudy(self) -> None:
        workspace = self._workspace()
        if workspace is None:
            return

        def add() -> None:
            case = self.logic.add_to_study(workspace, self.parameters.inputVolume, self.parameters.segmentation,
                                           self.parameters.axis)
            self.ui.refineStatusLabel.setText(f"added case {case} to {workspace}")

        run_guarded("SSLMedSAM2 could not add the case to the study.", add, _show_error)

    def onRefine(self) -> None:
        workspace = self._workspace()
        if workspace is None:
            return

        def start() -> None:
            self.logic.start_refine(workspace, self.parameters.rounds, self.parameters.quick,
                                    self.parameters.warmStart, self.parameters.device)
            self._follow(workspace, fresh=True)

        run_guarded("SSLMedSAM2 could not start the refinement.", start, _show_error)

    def reattachRefine(self) -> None:
        """Opening the module (or Slicer) while a job runs: follow it again."""
        path = self.parameters.workspace
        if self._monitor is not None or not path or str(path) in ("", "."):
            return  # already following (entering the module again), or no workspace
        if self.logic.refine_status(Path(path)).get("state") == "running":
            self._follow(Path(path), fresh=False)

    def _follow(self, workspace: Path, fresh: bool) -> None:
        self._monitor = self.logic.refine_monitor(workspace, fresh)
        self.ui.refineButton.enabled, self.ui.cancelRefineButton.enabled = False, True
        self._timer.start()

    def _stopFollowing(self, text: str) -> None:
        self._timer.stop()
        self._monitor = None
        self.ui.refineButton.enabled, self.ui.cancelRefineButton.enabled = True, False
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
            self.parameters.inputVolume, self.parameters.segmentation = volume, segmentation
            self.ui.refineStatusLabel.setText(f"loaded {case} from {round_name} for review")

        run_guarded("SSLMedSAM2 could not load the refined pseudo-labels.", load, _show_error)

    # --- dependencies ----------------------------------------------------------------------------------------
    def onInstall(self) -> None:
        missing = self.logic.missing_dependencies()
        if not missing:
            self.ui.dependencyStatusLabel.setText("All dependencies are installed.")
            return
        if not slicer.util.confirmOkCancelDisplay(missing, "SSLMedSAM2: install dependencies"):
            return
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed; see the Python console for pip's output.",
                                             waitCursor=True):
            self.logic.install_dependencies()
            self.ui.dependencyStatusLabel.setText("Dependencies installed.")
