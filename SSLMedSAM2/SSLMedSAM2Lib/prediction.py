"""The study's own model in the panel: "Segment with the study's model" (`sslmedsam2 predict`) and "Refine with SAM2
from the best slices" (`sslmedsam2 keyslices`, then the usual propagation from those slices and the reviewer's).

Both engine commands run in the logic's QProcess; the propagation goes through the logic's engine session. The
prediction's files stay in a temporary folder until the next prediction, a scene close or Slicer's exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from SSLMedSAM2Lib import scene_io, study_io
from SSLMedSAM2Lib.launch import import_engine
from SSLMedSAM2Lib.parameters import (EngineSettings, connection_problems, jobs_problems, keyslices_command,
                                      predict_command, problems)
from SSLMedSAM2Lib.study_seeds import key_slice_prompts, label_map, label_slots, read_label_array
from SSLMedSAM2Lib.temporary import TEMPORARY


@dataclass
class Prediction:
    """The last prediction, kept with its confidence table for the key slices."""

    folder: Path
    output: Path
    confidence: Path
    volume: object
    segmentation: object
    labels: dict[str, int]
    slots: list[str]  # slots[v - 1]: the segment id of workspace label value v
    axis: str
    confidence_per_slice: list[float]


class StudyModelRuns:
    def __init__(self, logic) -> None:
        self.logic = logic  # SSLMedSAM2Logic: its QProcess, propagation, review and signals
        self.prediction: Prediction | None = None

    def drop(self) -> None:
        if self.prediction is not None:
            TEMPORARY.remove(self.prediction.folder)
            self.prediction = None

    def predict(self, workspace: Path, volume, segmentation, device: str) -> str:
        """Segment the volume with the workspace's latest refined nnU-Net; the result lands in the segmentation (or
        a new one), in segments named after the workspace's labels, and its confidence table starts the review.
        Returns the workspace's slice axis, which the review must use."""
        logic = self.logic
        if volume is None:
            raise ValueError("Choose a volume.")
        found = jobs_problems(logic.connection)
        if found:
            raise ValueError(" ".join(found))
        labels, axis = study_io.workspace_labels(workspace)
        logic.check_idle()
        self.drop()
        folder = TEMPORARY.make("SSLMedSAM2-predict-")
        try:
            image = scene_io.export_volume(volume, folder / "image.nrrd")
        except BaseException:
            TEMPORARY.remove(folder)
            raise
        output = folder / "prediction.nrrd"
        generation = logic.generation

        def then(error: str) -> None:
            if generation != logic.generation:
                TEMPORARY.remove(folder)
                return logic.runFinished.emit("cancelled")
            try:
                if not error:
                    self._load(folder, output, volume, segmentation, labels, axis)
            except Exception as exc:  # reported in the panel
                error = f"could not load the prediction: {exc}"
            if error:
                TEMPORARY.remove(folder)
            logic.runFinished.emit(error)

        logic.notes = []
        logic.run_command(predict_command(str(workspace), str(image), str(output), device), then)
        return axis

    def _load(self, folder: Path, output: Path, volume, segmentation, labels: dict[str, int], axis: str) -> None:
        import_engine()
        from sslmedsam2.labelmap.confidence import read_confidence
        from sslmedsam2.study.review_session import ReviewSession

        if segmentation is None:
            segmentation = scene_io.new_segmentation(volume, f"{volume.GetName()} prediction")
        segment_of = scene_io.ensure_segments(segmentation, sorted(labels, key=labels.get))
        slots = label_slots(labels, segment_of)
        before = scene_io.snapshot(segmentation, volume)
        scene_io.import_labels(output, segmentation, slots, volume)
        confidence = folder / "prediction.confidence.csv"
        rows = read_confidence(confidence)
        review = ReviewSession.from_confidence(rows, 1 + max(r.slice for r in rows))
        review.checkpoint(before)  # Undo brings back the segmentation as it was
        self.logic.review = review
        self.prediction = Prediction(folder, output, confidence, volume, segmentation, labels, slots, axis,
                                     list(review.confidence))
        self.logic.reviewChanged.emit()

    def refine_from_key_slices(self, volume, segmentation, settings: EngineSettings) -> None:
        """`keyslices` on the last prediction (ranked by its own confidence table), then the usual propagation from
        those slices and the reviewer's own (seed, edited, accepted), then the usual review."""
        logic, p = self.logic, self.prediction
        if p is None or p.volume is not volume or p.segmentation is not segmentation:
            raise ValueError("Segment this volume with the study's model first: the key slices are chosen from its "
                             "prediction.")
        if settings.axis != p.axis:
            raise ValueError(f"The slice axis is {settings.axis}, the workspace's is {p.axis}: set it back.")
        found = problems(settings) + connection_problems(logic.connection)
        if found:
            raise ValueError(" ".join(found))
        logic.check_idle()
        seeds_path = p.folder / "keyslices.nrrd"  # replaced by the next refinement
        generation = logic.generation

        def then(error: str) -> None:
            if generation != logic.generation:
                return logic.runFinished.emit("cancelled")
            try:
                if not error:
                    return self._propagate(p, seeds_path, volume, segmentation, settings)
            except Exception as exc:  # reported in the panel
                error = f"could not use the key slices: {exc}"
            logic.runFinished.emit(error)

        logic.notes = []
        logic.run_command(keyslices_command(str(p.output), str(seeds_path), str(p.confidence), p.axis), then)

    def _propagate(self, p: Prediction, seeds_path: Path, volume, segmentation, settings: EngineSettings) -> None:
        from sslmedsam2.study.review import SliceState

        logic = self.logic
        keys = read_label_array(seeds_path, scene_io.array_shape(volume))
        ids = scene_io.segment_ids(segmentation)
        snapshot = scene_io.snapshot(segmentation, volume)
        segment_value = {v: ids.index(p.slots[v - 1]) + 1 for v in p.labels.values() if p.slots[v - 1] in ids}
        review = logic.review
        human = review.prompt_slices() if review is not None else []
        rejected = [z for z, s in enumerate(review.states) if s == SliceState.REJECTED] if review is not None else []
        seeds, prompts, used = key_slice_prompts(keys, segment_value, label_map([snapshot[s] for s in ids]), human,
                                                 rejected, scene_io.array_axis(volume, p.axis))
        logic.message.emit(f"key slices {used}; SAM2 propagates from {len(prompts)} slices")

        def keep_nnunet_confidence(result) -> None:
            """Key slices come back as drawn (confidence 1 for SAM2) but nobody vouched for them: they keep
            nnU-Net's confidence, so the review still visits them in order."""
            current = logic.review
            for z in used:
                if z < len(current.confidence) and z < len(p.confidence_per_slice):
                    current.confidence[z] = p.confidence_per_slice[z]
            logic.notes.append(f"prompts: nnU-Net's key slices {used} and {len(human)} reviewed slices")
            logic.reviewChanged.emit()

        logic.propagate(volume, segmentation, settings, prompts, seeds=seeds, then=keep_nnunet_confidence)
