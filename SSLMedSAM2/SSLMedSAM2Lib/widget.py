"""The panel: binds the .ui to the parameter node and the logic; nothing here computes.

Scene close: the parameter node, the embedded editor and the review marker let go at its start and come back at
its end (as Slicer's module template and Segment Editor module do).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from SSLMedSAM2Lib import scene_io
from SSLMedSAM2Lib.editor import EmbeddedEditor
from SSLMedSAM2Lib.install_panel import InstallPanel
from SSLMedSAM2Lib.logic import SSLMedSAM2Logic
from SSLMedSAM2Lib.parameter_node import SSLMedSAM2ParameterNode
from SSLMedSAM2Lib.parameters import plain_http_warning
from SSLMedSAM2Lib.study_panel import StudyPanel

# Jobs on this computer whatever the engine, in Slicer's own Python or with the local engine's engine command: off,
# with the reason as tooltip, where Slicer's Python cannot run the engine (macOS x86_64) and no engine command is set
LOCAL_JOBS = ("runFewShotButton", "predictButton", "refineFromKeySlicesButton", "refineButton")
SHORTCUTS = {"Alt+A": "onAccept", "Alt+R": "onReject", "Alt+N": "onNextUnreviewed", "Alt+P": "onPreviousUnreviewed",
             "Alt+L": "onLowestConfidence"}


def _show_error(text: str, details: str) -> None:
    slicer.util.errorDisplay(text, detailedText=details)


def slicer_dialogs() -> SimpleNamespace:
    """slicer.util's dialogs, as the install section calls them."""
    return SimpleNamespace(errorDisplay=slicer.util.errorDisplay, confirmOkCancelDisplay=slicer.util.confirmOkCancelDisplay,
                           restart=slicer.util.restart)


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
        self._importing = False  # our own Undo writes the segmentation: not a person's edit
        self._running = False  # a run is under way, from its start until its result is in (or it failed)
        self._afterSuccess = None  # what the panel does once the current run succeeded
        self._confirmedUrls: set[str] = set()  # plain-http remote engines the user accepted (once per session)
        self.logic.progress.connect(self.onProgress)
        self.logic.message.connect(self.showStatus)
        self.logic.runFinished.connect(self.onRunFinished)
        self.logic.reviewChanged.connect(self.updateReview)
        u = ui
        u.propagateButton.connect("clicked()", self.onPropagate)
        u.cancelButton.connect("clicked()", self.logic.cancel)
        u.cancelStudyRunButton.connect("clicked()", self.logic.cancel)
        u.repropagateButton.connect("clicked()", self.onRepropagate)
        u.exactButton.connect("clicked()", self.onRepropagateExact)
        u.acceptButton.connect("clicked()", self.onAccept)
        u.rejectButton.connect("clicked()", self.onReject)
        u.undoButton.connect("clicked()", self.onUndo)
        u.nextUnreviewedButton.connect("clicked()", self.onNextUnreviewed)
        u.previousUnreviewedButton.connect("clicked()", self.onPreviousUnreviewed)
        u.lowestConfidenceButton.connect("clicked()", self.onLowestConfidence)
        u.sliceTable.connect("cellDoubleClicked(int,int)", lambda row, column: self.jumpTo(int(u.sliceTable.item(row, 0).text())))
        u.runFewShotButton.connect("clicked()", self.onRunFewShot)
        self.install = InstallPanel(ui, slicer_dialogs(), lambda: self.logic.connection.need, self._busy,
                                    available=self.available)
        self.study = StudyPanel(self)
        self.refusal = self.logic.local_refusal()  # the platform cannot run the engine in Slicer's Python
        self._toolTips = {name: getattr(ui, name).toolTip for name in LOCAL_JOBS}
        self.showAvailability()
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
        self.study.reattachRefine()

    def onParameterChanged(self, *_) -> None:
        if self.parameters is None:
            return
        inputs = (self.parameters.inputVolume, self.parameters.segmentation)
        if inputs != self._inputs:
            self._inputs = inputs
            self.onSegmentationChanged()
        self.logic.connection = self.parameters.connection()
        remote = self.parameters.engine == "remote"
        for widget in (self.ui.serverUrlLabel, self.ui.serverUrlLineEdit, self.ui.serverTokenFileLabel,
                       self.ui.serverTokenFilePathLineEdit):
            widget.visible = remote  # the engine's own fields only: a server elsewhere, or one started here
        for widget in (self.ui.engineCommandLabel, self.ui.engineCommandPathLineEdit):
            widget.visible = not remote
        self.ui.engineStatusLabel.setText(self.logic.engine_status())
        self.showAvailability()

    def showAvailability(self) -> None:
        """The local jobs' buttons follow the engine setting: off, the reason as tooltip, where nothing here can run
        them; on again once something can (unless a run, an install or a followed refinement holds them)."""
        for name in LOCAL_JOBS:
            button, available = getattr(self.ui, name), self.available(name)
            button.toolTip = self._toolTips[name] if available else self.refusal
            if not available:
                button.enabled = False
            elif not (self._busy() or self.install.installing or (name == "refineButton" and self.study.following)):
                button.enabled = True

    def onSceneStartClose(self, *_) -> None:
        """Everything that refers to the scene's nodes lets go: the run, the review, its marker, the editor, the
        engine's open session."""
        self.logic.scene_closed()
        self.updateReview()
        self.study.stop()
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
        self.study.stop()
        self.logic.cleanup()
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
        if self._importing or self._busy() or self.logic.review is None:
            return
        z = scene_io.current_slice(self.parameters.axis, self.parameters.inputVolume)
        if z is not None and z < len(self.logic.review.states) and self.logic.review.edited(z):
            self.updateReview()

    # --- propagation -----------------------------------------------------------------------------------------
    def settings(self, local_job: bool = False):
        """The engine settings, after asking before a download (None: the user said no)."""
        settings = self.parameters.engine_settings()
        question = self.logic.weights_to_download(settings, local_job)
        if question:
            if not slicer.util.confirmOkCancelDisplay(question, "SSLMedSAM2: download model weights"):
                return None
            settings.allow_download = True
        return settings

    def _confirmPlainHttp(self) -> bool:
        """A remote engine beyond this computer over plain http: the user confirms once, knowing why."""
        connection = self.logic.connection
        warning = plain_http_warning(connection.url) if connection.engine == "remote" else ""
        if not warning or connection.url in self._confirmedUrls:
            return True
        if not slicer.util.confirmOkCancelDisplay(warning, "SSLMedSAM2: unencrypted connection"):
            return False
        self._confirmedUrls.add(connection.url)
        return True

    def _start(self, prompt_slices=None, mode: str = "local") -> None:
        def start() -> None:
            if not self._confirmPlainHttp():
                return
            settings = self.settings()  # imports the engine: inside the guard, after the dependency check
            if settings is None:
                return
            # a fresh propagation (no prompt slices) gets a new review when it succeeds; until then the old stays
            self.logic.propagate(self.parameters.inputVolume, self.parameters.segmentation, settings, prompt_slices,
                                 mode=mode)
            self.startedRun("propagating...")

        self.install.guarded("SSLMedSAM2 could not start the propagation.", start, _show_error)

    def onPropagate(self) -> None:
        self._start()

    def onRepropagate(self, mode: str = "local") -> None:
        if self.logic.review is None:
            slicer.util.errorDisplay("Propagate first; re-propagation starts from the reviewed slices.")
            return
        self._start(self.logic.review.prompt_slices(), mode)

    def onRepropagateExact(self) -> None:
        self.onRepropagate("exact")

    def onProgress(self, done: int, total: int) -> None:
        self.ui.progressBar.setMaximum(max(total, 1))
        self.ui.progressBar.setValue(done)

    def showStatus(self, text: str) -> None:
        """The run's status line, in the propagation section and in the study section alike."""
        self.ui.statusLabel.setText(text)
        self.ui.studyRunStatusLabel.setText(text)

    def startedRun(self, text: str, after_success=None) -> None:
        """A run started: buttons off, Cancel on; our own import of its result is not a person's edit."""
        self._afterSuccess = after_success
        self._running = True
        self._setBusy(True, text)

    def onRunFinished(self, error: str) -> None:
        self._running = False
        after, self._afterSuccess = self._afterSuccess, None
        notes = "; ".join(self.logic.notes)
        done = "done: review the slices below" + (f" ({notes})" if notes else "")
        self._setBusy(False, "cancelled" if error == "cancelled" else error or done)
        self.ui.engineStatusLabel.setText(self.logic.engine_status())
        if error and error != "cancelled":
            slicer.util.errorDisplay(f"SSLMedSAM2: {error}")
        elif not error and after is not None and self.parameters is not None:
            after()
        elif not error and self.logic.review is None:
            self._loadFewShotResult()
        self.updateSeedSlices()

    def _setBusy(self, busy: bool, text: str) -> None:
        """While a run works on the segmentation, nothing else may change it (its result would replace the
        change): the inputs and their editor, and the review's Accept, Reject and Undo, are locked."""
        if busy:
            self.ui.segmentEditorWidget.setActiveEffect(None)  # a paint stroke in progress ends here
        installing = self.install.installing  # an install keeps the engine buttons off until it ends
        for name in ("propagateButton", "repropagateButton", "exactButton", "runFewShotButton", "predictButton",
                     "refineFromKeySlicesButton"):
            getattr(self.ui, name).enabled = not busy and not installing and self.available(name)
        for widget in (self.ui.inputsCollapsibleButton, self.ui.acceptButton, self.ui.rejectButton):
            widget.enabled = not busy
        review = self.logic.review
        self.ui.undoButton.enabled = not busy and review is not None and review.can_undo
        self.ui.cancelButton.enabled = self.ui.cancelStudyRunButton.enabled = busy
        self.showStatus(text)
        if busy:
            self.ui.progressBar.setValue(0)

    def available(self, name: str) -> bool:
        """Whether what the button does can run here at all (see LOCAL_JOBS)."""
        return not (name in LOCAL_JOBS and self.refusal and not self.logic.connection.jobs_command)

    def _busy(self) -> bool:
        """A run is under way, the import of its result included."""
        return self._running or self.logic.busy

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
        self.ui.undoButton.enabled = review.can_undo and not self._busy()
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
        if not self._busy() and self.logic.review is not None and self._here() is not None:
            self.logic.review.accept(self._here())
            self.updateReview()
            self.jumpTo(self.logic.review.next_unreviewed(self._here()))

    def onReject(self) -> None:
        if not self._busy() and self.logic.review is not None and self._here() is not None:
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
        if not self._busy() and self.logic.review is not None and self.logic.review.can_undo:
            self._importing = True
            try:
                self.logic.undo(self.parameters.inputVolume, self.parameters.segmentation)
            finally:
                self._importing = False

    # --- few-shot --------------------------------------------------------------------------------------------
    def onRunFewShot(self) -> None:
        def start() -> None:
            p = self.parameters
            settings = self.settings(local_job=True)
            if settings is None:
                return
            self.logic.review = None
            self._fewShot = self.logic.run_few_shot(
                settings, str(p.supportImages), str(p.supportLabels), str(p.queryImages), str(p.fewShotOutput),
                p.insertions, p.supports, self.ui.supportSegmentationsSelector.checkedNodes(),
                self.ui.queryVolumesSelector.checkedNodes())
            self.startedRun("few-shot pseudo-labels...")

        self.install.guarded("SSLMedSAM2 could not start the few-shot run.", start, _show_error,
                             self.logic.connection.jobs_need)

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
        where = (f"{output / 'ranking.csv'}, a temporary folder deleted at scene close" if self.logic.fewshot_output
                 else f"{output / 'ranking.csv'}")
        self.ui.statusLabel.setText(f"loaded {name}, the least trustworthy query (the others: {where})")
