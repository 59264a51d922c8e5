"""What the panel's buttons do, written against the scene and the engine; no widgets here.

Two ways to the engine: Propagate and Re-propagate go through a `sslmedsam2 serve` session (the module's local
server or a remote one; interactive.py, client calls on one worker thread, delivered by a QTimer on the main
thread); few-shot, predict and key slices run as engine commands in a QProcess (engine_process.py); refinement is a
job of its own (refine_control.py); those run in Slicer's own Python, or with the local engine's engine command.
Every run ends with runFinished(error or "").
"""

from __future__ import annotations

import atexit
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import qt
import slicer

from SSLMedSAM2Lib import scene_io, study_io
from SSLMedSAM2Lib.engine_process import EngineProcess
from SSLMedSAM2Lib.geometry import put_in_frame_of
from SSLMedSAM2Lib.interactive import EngineWorker, InteractiveEngine, PropagationRequest, VolumeSource, user_message
from SSLMedSAM2Lib.launch import external_models, import_engine, set_startup_environment
from SSLMedSAM2Lib.parameters import (Connection, EngineSettings, connection_problems, jobs_problems, problems,
                                      pseudolabel_command, refine_command)
from SSLMedSAM2Lib.prediction import StudyModelRuns
from SSLMedSAM2Lib.refine_control import RefineControl
from SSLMedSAM2Lib.requirements import Environment, RequirementsMissing, local_engine_refusal, project, under_rosetta
from SSLMedSAM2Lib.server_process import shared_server, stop_shared_server
from SSLMedSAM2Lib.signal import Signal
from SSLMedSAM2Lib.study_seeds import label_map, slices_with_labels
from SSLMedSAM2Lib.temporary import TEMPORARY

PUMP_MS = 25  # how often the main thread takes the worker's news (and yields it the GIL) while it works
CLOSE_WAIT_S = 5.0  # at exit, how long the engine session's close may take (a remote server that does not answer)
EDITED_DURING_RUN = ("the segmentation was edited while the engine worked: its result was not applied, so the edit "
                     "is kept; propagate again to include it")
_EXIT_HOOKED = False


class _EditedMeanwhile(Exception):
    pass


def _at_exit() -> None:
    stop_shared_server()
    TEMPORARY.remove_all()  # exported patient images and results in temporary folders


def _stop_server_at_exit() -> None:
    """Once per Slicer session: the local engine stops with Slicer (its stdin pipe also closes if Slicer dies), and
    the temporary folders go. An engine command runs in the environment Slicer was started in."""
    global _EXIT_HOOKED
    if not _EXIT_HOOKED:
        slicer.app.connect("aboutToQuit()", _at_exit)
        atexit.register(_at_exit)
        set_startup_environment(slicer.util.startupEnvironment)
        _EXIT_HOOKED = True


def local_refusal() -> str | None:
    """Why the engine cannot run in Slicer's own Python on this computer (macOS x86_64), or None."""
    try:
        torch = project().requirement("torch")
    except RequirementsMissing as exc:
        return str(exc)
    return local_engine_refusal(Environment(rosetta=under_rosetta()), torch)


class SSLMedSAM2Logic:
    def __init__(self) -> None:
        self.process = EngineProcess()
        self.process.finished.connect(self._on_process_finished)
        self.worker = EngineWorker()
        self.engine = InteractiveEngine(shared_server())
        self.connection = Connection()
        self.progress = Signal(int, int)
        self.message = Signal(str)
        self.process.progress.connect(self.progress.emit)
        self.process.message.connect(self.message.emit)
        self.review = None  # sslmedsam2.study.review_session.ReviewSession of the current segmentation
        self.fewshot_query_nodes: dict[str, object] = {}  # exported query file name -> its scene volume
        self.fewshot_output: Path | None = None  # a few-shot run's temporary output folder (none chosen)
        self._refusal: list[str | None] = []  # local_refusal(), once
        self.study_model = StudyModelRuns(self)  # "Segment with the study's model" and its key-slice refinement
        self.notes: list[str] = []  # what the user should know about the last run (a restarted engine, say)
        self.reviewChanged = Signal()
        self.runFinished = Signal(str)  # error message, "" on success
        self._after_process: Callable[[str], None] | None = None
        self._before = None  # the segmentation before the current run, for Undo
        self._engine_undos = 0  # propagations undone in the panel since the last run: the session undoes them first
        self._generation = 0  # a closed scene makes late results of older runs moot
        self.refine: RefineControl | None = None  # the refine job of the workspace the panel follows
        self._pump = qt.QTimer()
        self._pump.setInterval(PUMP_MS)
        self._pump.connect("timeout()", self._on_pump)
        _stop_server_at_exit()

    @property
    def generation(self) -> int:
        """Grows at every scene close: a run's late result for an older scene is dropped."""
        return self._generation

    @property
    def busy(self) -> bool:
        return self.process.running or self.worker.busy

    # --- weights and the engine's status ----------------------------------------------------------------------
    def weights_to_download(self, settings: EngineSettings, local_job: bool = False) -> str:
        """A sentence asking to download the model's weights, or "" when a file is already at hand (or a remote
        engine propagates with its own). local_job: for a run on this machine whatever the engine (few-shot,
        refinement)."""
        if settings.checkpoint or (self.connection.engine == "remote" and not local_job):
            return ""
        if self.connection.jobs_command:  # the engine command's own cache, as it reports it
            listed = {m["name"]: m for m in external_models(self.connection.jobs_command)["models"]}
            model = listed.get(settings.model)
            if model is None or model["cached"]:
                return ""
            size, url, path = model["size_mb"] * 1e6, model["url"], model["path"]
        else:
            import_engine()
            from sslmedsam2.models import get_model
            from sslmedsam2.models.cache import cached_path, is_cached

            spec = get_model(settings.model)
            if is_cached(spec):
                return ""
            size, url, path = spec.size_bytes, spec.url, cached_path(spec)
        return (f"The {settings.model} weights ({size / 1e6:.0f} MB) are not on this computer. Download them from "
                f"{url} into {path} (checked against their SHA256)? Or choose a local checkpoint file in 'Models and "
                f"dependencies'.")

    def local_refusal(self) -> str | None:
        """Why the engine cannot run in Slicer's own Python on this computer (macOS x86_64), or None; asked once."""
        if not self._refusal:
            self._refusal.append(local_refusal())
        return self._refusal[0]

    def engine_status(self) -> str:
        if self.connection.engine == "remote":
            return f"remote engine at {self.connection.url or '(no address yet)'}"
        if not self.connection.command and self.local_refusal() and not self.engine.local.alive():
            return self.local_refusal()
        return self.engine.local.describe()

    # --- running things --------------------------------------------------------------------------------------
    def check_idle(self) -> None:
        if self.busy:
            raise RuntimeError("The engine is still working on the previous run: wait for it or press Cancel.")

    def run_command(self, arguments: list[str], then: Callable[[str], None]) -> None:
        """An engine command in the QProcess (with the engine command, if the local engine has one); `then(error or
        "")` runs when it ends (on the main thread)."""
        self._after_process = then
        self.process.start(arguments, self.connection.jobs_command)

    def _on_process_finished(self, error: str) -> None:
        then, self._after_process = self._after_process, None
        (then or self.runFinished.emit)(error)

    def _on_pump(self) -> None:
        if not self.worker.pump():
            self._pump.stop()

    def cancel(self) -> None:
        self.process.cancel()
        self.worker.cancel()

    def _close_session(self) -> None:
        """Cancel what runs, then close the engine session (its data is deleted on the server): queued after the
        cancelled run, so it runs once that run has stopped."""
        self.cancel()
        self.worker.submit(lambda reporter: self.engine.close(), lambda result, error: None)

    def scene_closed(self) -> None:
        """Results of runs started before a scene close have nowhere to go; the open session is closed too, and a
        few-shot run's temporary output is deleted."""
        self._generation += 1
        self.review = None
        self.study_model.drop()
        self._drop_fewshot_output()
        self._close_session()
        self._pump.start()

    def cleanup(self) -> None:
        """Slicer exits or the module is torn down: the session on a remote engine must not outlive it (the local
        engine stops with Slicer anyway). Waits a few seconds at most for the close."""
        self.study_model.drop()
        self._drop_fewshot_output()
        self._close_session()
        self.worker.close(timeout=CLOSE_WAIT_S)

    # --- propagation and review ------------------------------------------------------------------------------
    def propagate(self, volume, segmentation, settings: EngineSettings, prompt_slices: list[int] | None = None,
                  seeds=None, then: Callable[[object], None] | None = None, mode: str = "local") -> None:
        """SAM2 through the engine session, in the background; runFinished fires when the segmentation holds the
        result. seeds: a (k, j, i) label map (segment i as i + 1) instead of the segmentation's own content.
        mode: local (an edit re-tracks around the slices it changes) or exact (every slice again)."""
        found = problems(settings) + connection_problems(self.connection)
        if volume is None or segmentation is None:
            found.append("Choose a volume and a segmentation.")
        elif not scene_io.segment_ids(segmentation):
            found.append("The segmentation has no segment: add one per structure and draw a few slices.")
        if found:
            raise ValueError(" ".join(found))
        self.check_idle()
        ids = scene_io.segment_ids(segmentation)
        before = scene_io.snapshot(segmentation, volume)
        seeds = label_map([before[sid] for sid in ids]) if seeds is None else seeds
        axis = scene_io.array_axis(volume, settings.axis)
        prompts = slices_with_labels(seeds, axis) if prompt_slices is None else list(prompt_slices)
        connection = dataclasses.replace(self.connection)
        key = (*scene_io.volume_key(volume), settings.axis, settings.modality, settings.model, settings.image_size)
        data = None if self.engine.holds(key, connection) else self._volume_bytes(volume)
        source = VolumeSource(key, f"{scene_io.file_name(volume)}.nrrd", settings.axis, settings.modality, data)
        request = PropagationRequest(connection, settings, source, seeds, prompts, mode, self._engine_undos)
        self._engine_undos = 0
        self._before, self.notes = before, []
        generation = self._generation
        fresh = prompt_slices is None  # a new review on success; a failed or cancelled run keeps the old one

        def done(result, error) -> None:
            self._on_propagated(generation, connection, (volume, segmentation, ids, axis, then, fresh), result, error)

        self.worker.submit(lambda reporter: self.engine.propagate(request, reporter), done, self.progress.emit,
                           self.message.emit)
        self._pump.start()

    @staticmethod
    def _volume_bytes(volume) -> bytes:
        folder = TEMPORARY.make("SSLMedSAM2-")
        try:
            return scene_io.export_volume(volume, folder / "image.nrrd", compressed=False).read_bytes()
        finally:
            TEMPORARY.remove(folder)

    def _on_propagated(self, generation: int, connection: Connection, target, result, error) -> None:
        if generation != self._generation:
            self.runFinished.emit("cancelled")  # the scene it was for is closed
            return
        volume, segmentation, ids, axis, then, fresh = target
        message = user_message(error, connection) if error is not None else ""
        if error is None:
            try:
                if result.array_axis != axis:
                    raise RuntimeError(f"the engine sliced along array axis {result.array_axis}, the panel along {axis}")
                # a person painted meanwhile (in another module: this one locks its editor while it runs)
                if _edited(self._before, scene_io.snapshot(segmentation, volume)):
                    raise _EditedMeanwhile(EDITED_DURING_RUN)
                scene_io.import_array(result.labels, segmentation, ids, volume)
                self._load_review(result.confidence, fresh)
                self.notes = [f"computed by {result.where}", *result.notes]
                if result.retracked is not None:
                    self.notes.append(f"re-tracked slices {slice_ranges(result.retracked)} around the changed "
                                      "slices (Re-propagate all (exact) recomputes every slice)")
                if then is not None:
                    then(result)
            except _EditedMeanwhile as exc:
                message = str(exc)
            except Exception as exc:  # reported in the panel, never a hang
                message = f"could not load the result: {exc}"
        self.runFinished.emit(message)

    def _load_review(self, rows, fresh: bool) -> None:
        import_engine()
        from sslmedsam2.study.review_session import ReviewSession

        n = 1 + max(r.slice for r in rows)
        loaded = ReviewSession.from_confidence(rows, n)
        if not fresh and self.review is not None and len(self.review.states) == n:
            # a re-propagation: vouched-for slices were its prompts and stay as they are; rejected ones are new
            self.review.confidence = loaded.confidence
            self.review.repropagated(payload=self._before)
        else:
            self.review = loaded
            self.review.checkpoint(self._before)  # the first propagation can be undone too
        self.reviewChanged.emit()

    def undo(self, volume, segmentation) -> None:
        """Undo the review's last step; a propagation's is undone in the engine session too (in the background), so
        that the next local re-propagation starts from the result now shown."""
        saved = self.review.undo()
        if saved is not None:  # the engine session goes back too, before the next propagation
            scene_io.restore(segmentation, volume, saved)
            self._engine_undos += 1
        self.reviewChanged.emit()

    # --- few-shot --------------------------------------------------------------------------------------------
    def run_few_shot(self, settings: EngineSettings, support_images: str, support_labels: str, queries: str,
                     output: str, insertions: int, supports: int, support_nodes=(), query_nodes=()) -> str:
        """Folders when given, else the checked scene nodes, exported to temporary folders that are deleted when the
        run ends; without an output folder, one in the temporary folder, deleted with the next few-shot run, at
        scene close or at exit (its results are loaded into the scene). Returns the output folder."""
        found = problems(settings) + jobs_problems(self.connection)
        self.check_idle()
        self.fewshot_query_nodes = {}
        exports: list[Path] = []
        try:
            if not (study_io.chosen(support_images) and study_io.chosen(support_labels)) and support_nodes:
                exports.append(TEMPORARY.make("SSLMedSAM2-supports-"))
                support_images, support_labels = study_io.export_supports(list(support_nodes), found, exports[-1])
            if not study_io.chosen(queries) and query_nodes:
                exports.append(TEMPORARY.make("SSLMedSAM2-queries-"))
                queries = study_io.export_queries(list(query_nodes), self.fewshot_query_nodes, exports[-1])
            found += [f"Choose the {what} (folder or scene nodes)." for what, path in
                      (("support images", support_images), ("support labels", support_labels),
                       ("query images", queries)) if not study_io.chosen(path)]
            if found:
                raise ValueError(" ".join(found))
        except BaseException:
            TEMPORARY.remove(*exports)
            raise
        self._drop_fewshot_output()
        if not study_io.chosen(output):
            self.fewshot_output = TEMPORARY.make("SSLMedSAM2-fewshot-")
            output = str(self.fewshot_output)

        def then(error: str) -> None:
            TEMPORARY.remove(*exports)  # the exported patient images: the run is over
            if error:
                self._drop_fewshot_output()
            self.runFinished.emit(error)

        self.notes = []
        self.run_command(pseudolabel_command(settings, support_images, support_labels, queries, output, insertions,
                                              supports), then)
        return output

    def _drop_fewshot_output(self) -> None:
        TEMPORARY.remove(self.fewshot_output)
        self.fewshot_output = None

    least_trustworthy = staticmethod(study_io.least_trustworthy)

    def load_pseudo_label(self, image: Path, labels: Path, confidence: Path | None = None, states=None):
        """A few-shot or refined result as a volume + segmentation under review (confidence table or states)."""
        import_engine()
        from sslmedsam2.labelmap.confidence import check_pair, read_confidence
        from sslmedsam2.study.review_session import ReviewSession

        volume = self.fewshot_query_nodes.get(Path(image).name) or slicer.util.loadVolume(str(image))
        segmentation = slicer.util.loadSegmentation(str(labels))
        put_in_frame_of(segmentation, volume)  # the file is in the volume's local frame (a scene query's, say)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        if confidence is not None and confidence.is_file():
            check_pair(labels, confidence)  # a table of another run would rank the wrong slices
            rows = read_confidence(confidence)
            self.review = ReviewSession.from_confidence(rows, 1 + max(r.slice for r in rows))
        elif states:
            self.review = ReviewSession(list(states), [float("nan")] * len(states))
        self.reviewChanged.emit()
        return volume, segmentation

    def load_refined(self, workspace: Path):
        """The latest round's pseudo-label of the workspace's first case without ground truth, with its review."""
        image, labels, case, round_name, states = study_io.latest_refined(workspace)
        volume, segmentation = self.load_pseudo_label(image, labels, states=states)
        return volume, segmentation, case, round_name

    # --- study and refinement --------------------------------------------------------------------------------
    def add_to_study(self, workspace: Path, volume, segmentation, axis: str, replace: bool = False) -> str:
        """The volume and its segmentation (with the review) into the study; see study_io.add_to_study."""
        return study_io.add_to_study(workspace, volume, segmentation, axis,
                                     self.review.states if self.review is not None else None, replace)

    def start_refine(self, workspace: Path, rounds: int, quick: bool, warm_start: bool, device: str,
                     sam2: EngineSettings | None = None) -> None:
        """A process of its own session (no window on Windows): closing Slicer does not stop it, and the panel
        re-attaches on reopening. sam2: prompt SAM2 with nnU-Net's key slices in each round, with these settings."""
        found = jobs_problems(self.connection)
        if found:
            raise ValueError(" ".join(found))
        self.refine = RefineControl(workspace)
        self.refine.start(refine_command(str(workspace), rounds, quick, warm_start, device, sam2=sam2),
                          self.connection.jobs_command)

    def refine_monitor(self, workspace: Path, fresh: bool):
        """Reads the job's events from now on (fresh) or from the start of its latest run (re-attaching)."""
        import_engine()
        from sslmedsam2.refine.monitor import JobMonitor

        if self.refine is None or self.refine.workspace != Path(workspace):
            self.refine = RefineControl(workspace)  # re-attaching to a job started elsewhere or earlier
        monitor = JobMonitor(Path(workspace) / "refine")
        if fresh and monitor.log.path.exists():
            monitor.offset = monitor.log.path.stat().st_size
        else:
            monitor.attach_to_latest_run()
        return monitor

    @staticmethod
    def refine_status(workspace: Path) -> dict:
        import json

        path = Path(workspace) / "refine" / "status.json"
        return json.loads(path.read_bytes()) if path.is_file() else {}

    def cancel_refine(self, workspace: Path) -> str:
        """Ask the job to stop at its next safe point (portable: a request file); what happened, in words."""
        if self.refine is None or self.refine.workspace != Path(workspace):
            self.refine = RefineControl(workspace)
        return self.refine.cancel()


def slice_ranges(slices) -> str:
    """7, 8, 9, 11 -> '7-9, 11' ('none' when empty)."""
    runs: list[list[int]] = []
    for z in sorted(slices):
        if runs and z == runs[-1][-1] + 1:
            runs[-1].append(z)
        else:
            runs.append([z])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs) or "none"


def _edited(before: dict, now: dict) -> bool:
    """Whether a segmentation's segments (id -> array, as scene_io.snapshot gives) differ from an earlier snapshot."""
    return before.keys() != now.keys() or any(not np.array_equal(before[sid], now[sid]) for sid in before)
