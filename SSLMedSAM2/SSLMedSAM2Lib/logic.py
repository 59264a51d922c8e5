"""What the panel's buttons do, written against the scene and the engine; no widgets here."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import slicer

from SSLMedSAM2Lib import scene_io
from SSLMedSAM2Lib.dependencies import describe, plan_install
from SSLMedSAM2Lib.engine_process import EngineProcess
from SSLMedSAM2Lib.geometry import put_in_frame_of
from SSLMedSAM2Lib.launch import import_engine
from SSLMedSAM2Lib.parameters import EngineSettings, problems, propagate_command, pseudolabel_command, refine_command
from SSLMedSAM2Lib.refine_control import RefineControl
from SSLMedSAM2Lib.signal import Signal


class Run:
    """One propagation: its temporary files and how to read the result back."""

    def __init__(self, volume, segmentation, ids: list[str]) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="SSLMedSAM2-"))
        self.volume, self.segmentation, self.ids = volume, segmentation, ids
        self.output = self.folder / "result.nrrd"
        self.confidence = self.folder / "result.confidence.csv"


class SSLMedSAM2Logic:
    def __init__(self) -> None:
        self.process = EngineProcess()
        self.process.finished.connect(self._on_finished)
        self.review = None  # sslmedsam2.study.review_session.ReviewSession of the current segmentation
        self.fewshot_query_nodes: dict[str, object] = {}  # exported query file name -> its scene volume
        self.reviewChanged = Signal()
        self.runFinished = Signal(str)  # error message, "" on success
        self._run: Run | None = None
        self._before = None  # the segmentation before the current run, for Undo
        self.refine: RefineControl | None = None  # the refine job of the workspace the panel follows

    # --- dependencies and weights ----------------------------------------------------------------------------
    def missing_dependencies(self) -> str:
        return describe(plan_install())

    def install_dependencies(self) -> None:
        """On the main thread, as Slicer requires; pins Slicer's numpy, SimpleITK and torch."""
        plan = plan_install()
        if plan.torch_missing:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True, torchVersionRequirement=">=2.5.1") is None:
                raise RuntimeError("PyTorch was not installed")
            plan = plan_install()
        constraints = Path(slicer.util.tempDirectory("SSLMedSAM2-pip")) / "constraints.txt"
        constraints.write_text(plan.constraints)
        os.environ["SAM2_BUILD_CUDA"] = "0"  # sam2's optional CUDA extension needs a compiler; SAM2 runs without it
        for call in plan.pip_calls(str(constraints)):
            slicer.util.pip_install(call[1:])  # pip_install adds "install" itself
        if describe(plan_install()):
            raise RuntimeError("some packages are still missing after the installation: " + describe(plan_install()))

    def weights_to_download(self, settings: EngineSettings) -> str:
        """A sentence asking to download the model's weights, or "" when a file is already at hand."""
        if settings.checkpoint:
            return ""
        import_engine()
        from sslmedsam2.models import get_model
        from sslmedsam2.models.cache import cached_path, is_cached

        spec = get_model(settings.model)
        if is_cached(spec):
            return ""
        return (f"The {spec.name} weights ({spec.size_bytes / 1e6:.0f} MB) are not on this computer. Download them from "
                f"{spec.url} into {cached_path(spec)} (checked against their SHA256)? Or choose a local checkpoint file "
                f"in 'Models and dependencies'.")

    # --- propagation and review ------------------------------------------------------------------------------
    def propagate(self, volume, segmentation, settings: EngineSettings, prompt_slices: list[int] | None = None) -> None:
        """Start SAM2 in the background; runFinished fires when the segmentation holds the result."""
        found = problems(settings)
        if volume is None or segmentation is None:
            found.append("Choose a volume and a segmentation.")
        elif not scene_io.segment_ids(segmentation):
            found.append("The segmentation has no segment: add one per structure and draw a few slices.")
        if found:
            raise ValueError(" ".join(found))
        run = Run(volume, segmentation, scene_io.segment_ids(segmentation))
        image = scene_io.export_volume(volume, run.folder / "image.nrrd")
        seeds, _ = scene_io.export_segments(segmentation, volume, run.folder / "seeds.nrrd")
        arguments = propagate_command(settings, str(image), str(seeds), str(run.output))
        if prompt_slices is not None:
            arguments += ["--seed-slices", ",".join(str(z) for z in prompt_slices)]
        self._before = scene_io.snapshot(segmentation, volume)
        self._run = run
        self.process.start(arguments)

    def cancel(self) -> None:
        self.process.cancel()

    def _on_finished(self, error: str) -> None:
        run, self._run = self._run, None
        if run is None:  # a few-shot run: its results stay in its output folder
            self.runFinished.emit(error)
            return
        try:
            if not error:
                scene_io.import_labels(run.output, run.segmentation, run.ids, run.volume)
                self._load_review(run)
        except Exception as exc:  # reported in the panel, never a hang
            error = f"could not load the result: {exc}"
        finally:
            shutil.rmtree(run.folder, ignore_errors=True)
        self.runFinished.emit(error)

    def _load_review(self, run: Run) -> None:
        import_engine()
        from sslmedsam2.propagation.confidence import read_confidence
        from sslmedsam2.study.review_session import ReviewSession

        rows = read_confidence(run.confidence)
        n = 1 + max(r.slice for r in rows)
        fresh = ReviewSession.from_confidence(rows, n)
        if self.review is not None and len(self.review.states) == n:
            # a re-propagation: vouched-for slices were its prompts and stay as they are; rejected ones are new
            self.review.confidence = fresh.confidence
            self.review.repropagated(payload=self._before)
        else:
            self.review = fresh
            self.review.checkpoint(self._before)  # the first propagation can be undone too
        self.reviewChanged.emit()

    def undo(self, volume, segmentation) -> None:
        saved = self.review.undo()
        if saved is not None:
            scene_io.restore(segmentation, volume, saved)
        self.reviewChanged.emit()

    # --- few-shot --------------------------------------------------------------------------------------------
    def run_few_shot(self, settings: EngineSettings, support_images: str, support_labels: str, queries: str,
                     output: str, insertions: int, supports: int, support_nodes=(), query_nodes=()) -> str:
        """Folders when given, else the checked scene nodes (exported to a temporary folder); returns the output."""
        def chosen(path: str) -> bool:
            return bool(path) and path != "."

        found = problems(settings)
        self.fewshot_query_nodes = {}
        if not (chosen(support_images) and chosen(support_labels)) and support_nodes:
            support_images, support_labels = self._export_supports(list(support_nodes), found)
        if not chosen(queries) and query_nodes:
            queries = self._export_queries(list(query_nodes))
        found += [f"Choose the {what} (folder or scene nodes)." for what, path in
                  (("support images", support_images), ("support labels", support_labels), ("query images", queries))
                  if not chosen(path)]
        if found:
            raise ValueError(" ".join(found))
        if not chosen(output):
            output = tempfile.mkdtemp(prefix="SSLMedSAM2-fewshot-")
        self._run = None
        self.process.start(pseudolabel_command(settings, support_images, support_labels, queries, output,
                                               insertions, supports))
        return output

    def _export_supports(self, segmentations, found: list[str]) -> tuple[str, str]:
        """Each support segmentation with the volume it was drawn on; label values follow segment names, so that
        "liver" has the same value in every support (the engine refuses supports whose labels differ)."""
        folder = Path(tempfile.mkdtemp(prefix="SSLMedSAM2-supports-"))
        (folder / "images").mkdir()
        (folder / "labels").mkdir()
        names = sorted({seg.GetSegmentation().GetSegment(sid).GetName()
                        for seg in segmentations for sid in scene_io.segment_ids(seg)})
        for seg in segmentations:
            volume = scene_io.reference_volume(seg)
            if volume is None:
                found.append(f"Support {seg.GetName()} has no reference volume: set its source volume in Segment Editor.")
                continue
            segmentation = seg.GetSegmentation()
            ids = [segmentation.GetSegmentIdBySegmentName(name) for name in names]
            missing = [name for name, sid in zip(names, ids) if not sid]
            if missing:
                found.append(f"Support {seg.GetName()} has no segment named {', '.join(missing)}; every support needs "
                             "the same segments.")
                continue
            name = f"{scene_io.file_name(seg)}.nrrd"
            scene_io.export_volume(volume, folder / "images" / name)
            scene_io.export_segments(seg, volume, folder / "labels" / name, ids)
        return str(folder / "images"), str(folder / "labels")

    def _export_queries(self, volumes) -> str:
        folder = Path(tempfile.mkdtemp(prefix="SSLMedSAM2-queries-"))
        for volume in volumes:
            name = f"{scene_io.file_name(volume)}.nrrd"
            scene_io.export_volume(volume, folder / name)
            self.fewshot_query_nodes[name] = volume
        return str(folder)

    @staticmethod
    def least_trustworthy(output: Path) -> str | None:
        """The query file a few-shot run ranks first for review."""
        ranking = Path(output) / "ranking.csv"
        if not ranking.is_file():
            return None
        lines = ranking.read_text().splitlines()
        return lines[1].split(",")[1] if len(lines) > 1 else None

    def load_pseudo_label(self, image: Path, labels: Path, confidence: Path | None = None, states=None):
        """A few-shot or refined result as a volume + segmentation under review (confidence table or states)."""
        import_engine()
        from sslmedsam2.propagation.confidence import read_confidence
        from sslmedsam2.study.review_session import ReviewSession

        volume = self.fewshot_query_nodes.get(Path(image).name) or slicer.util.loadVolume(str(image))
        segmentation = slicer.util.loadSegmentation(str(labels))
        put_in_frame_of(segmentation, volume)  # the file is in the volume's local frame (a scene query's, say)
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        if confidence is not None and confidence.is_file():
            rows = read_confidence(confidence)
            self.review = ReviewSession.from_confidence(rows, 1 + max(r.slice for r in rows))
        elif states:
            self.review = ReviewSession(list(states), [float("nan")] * len(states))
        self.reviewChanged.emit()
        return volume, segmentation

    def load_refined(self, workspace: Path):
        """The latest round's pseudo-label of the workspace's first case without ground truth, with its review."""
        import_engine()
        from sslmedsam2.study.workspace import Workspace

        ws = Workspace.open(workspace)
        rounds = sorted((ws.refine_dir / "rounds").glob("round_*/pseudo"))
        cases = sorted(rounds[-1].glob("*.nii.gz")) if rounds else []
        if not cases:
            raise RuntimeError("no finished refinement round yet")
        case = cases[0].name[: -len(".nii.gz")]
        volume, segmentation = self.load_pseudo_label(ws.file(case, "image"), cases[0], states=ws.review(case))
        return volume, segmentation, case, rounds[-1].parent.name

    # --- study and refinement --------------------------------------------------------------------------------
    def add_to_study(self, workspace: Path, volume, segmentation, axis: str) -> str:
        """Image, segmentation (as pseudo-label) and review state into the workspace; returns the case id."""
        import_engine()
        from sslmedsam2.study.workspace import Workspace, add_case, init_workspace

        ids = scene_io.segment_ids(segmentation)
        if not (workspace / "workspace.json").is_file():
            names = [segmentation.GetSegmentation().GetSegment(sid).GetName() for sid in ids]
            init_workspace(workspace, {name: i + 1 for i, name in enumerate(names)}, axis=axis)
        ws = Workspace.open(workspace)
        folder = Path(tempfile.mkdtemp(prefix="SSLMedSAM2-study-"))
        try:
            image = scene_io.export_volume(volume, folder / "image.nrrd")
            labels, _ = scene_io.export_segments(segmentation, volume, folder / "labels.nrrd")
            case_id = "".join(c if c.isalnum() or c in "._-" else "_" for c in volume.GetName()) or "case"
            base, n = case_id, 1
            while case_id in ws.cases:
                n += 1
                case_id = f"{base}_{n}"
            add_case(ws, image, pseudo=labels, case_id=case_id)
            if self.review is not None:
                ws.set_review(case_id, list(self.review.states))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return case_id

    def start_refine(self, workspace: Path, rounds: int, quick: bool, warm_start: bool, device: str) -> None:
        """A process of its own session (no window on Windows): closing Slicer does not stop it, and the panel
        re-attaches on reopening."""
        self.refine = RefineControl(workspace)
        self.refine.start(refine_command(str(workspace), rounds, quick, warm_start, device))

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
        path = Path(workspace) / "refine" / "status.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def cancel_refine(self, workspace: Path) -> str:
        """Ask the job to stop at its next safe point (portable: a request file); what happened, in words."""
        if self.refine is None or self.refine.workspace != Path(workspace):
            self.refine = RefineControl(workspace)
        return self.refine.cancel()
