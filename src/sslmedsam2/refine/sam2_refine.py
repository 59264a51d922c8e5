"""`refine --sam2-from-nnunet` (the IFDL direction): nnU-Net's prediction prompts SAM2, SAM2's result is the next
pseudo-label.

For each case without ground truth, after the round's nnU-Net prediction and its softmax confidence table:
1. key slices of the prediction (`sslmedsam2.refine.keyslices`: per label, the most certain slices whose mask
   continues into both neighbours, spread over the label's extent);
2. seeds: the key slices' masks, plus the case's vouched-for slices (seed, accepted, edited) of its workspace
   pseudo-label exactly as they are (they win where a key slice falls on one);
3. SAM2 propagates the seeds through an engine session (sslmedsam2.session.local), as `propagate` does; one
   predictor serves every case of the step;
4. the pseudo-label is SAM2's result (fusion `sam2`), or, per slice, the source whose mean confidence over the
   prompted labels is higher (fusion `confidence`: SAM2's table against nnU-Net's softmax table; SAM2 wins ties).
   A label with no prompt at all (no key slice, no vouched-for slice) keeps nnU-Net's voxels where SAM2 left
   background; vouched-for slices are restored exactly. A case with no prompt at all keeps nnU-Net's prediction.

Per case in the round's `sam2/` folder: `seeds/<case>.nii.gz`, `<case>.json` (key slices, which source won how
many slices), `<case>.confidence.csv` (per slice, the winning source's rows) and `<case>.nii.gz` last; a resumed
step skips finished cases.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import write_text
from sslmedsam2.errors import UserError
from sslmedsam2.labelmap.confidence import (SliceConfidence, check_pair, confidence_path, pair_state,
                                               read_confidence, write_result)
from sslmedsam2.refine.keyslices import (DEFAULT_MIN_CONTINUITY, DEFAULT_PER_LABEL, certainty_from_table,
                                          check_parameters, seed_map, select_key_slices)
from sslmedsam2.jobs import Cancelled
from sslmedsam2.study.review import human_slices
from sslmedsam2.study.workspace import Workspace
from sslmedsam2.frames import IntensitySpec
from sslmedsam2.models.registry import DEFAULT_MODEL
from sslmedsam2.session.local import LocalSession
from sslmedsam2.session.prompts import planes_of
from sslmedsam2.settings import EngineSettings
from sslmedsam2.volume import check_same_grid, read_image, read_label_map, write_image
from sslmedsam2.volume.slices import SliceGrid, SliceVolume

FUSIONS = ("sam2", "confidence")
SOURCES = ("sam2", "nnunet", "human")


@dataclass
class Sam2Settings:
    engine: EngineSettings  # method sam2: never falls back to interpolation
    per_label: int
    min_continuity: float
    fusion: str = "sam2"
    log: Callable[[str], None] = print
    _predictor: object = field(default=None, repr=False)  # built when the first case needs it, kept for the rest

    def predictor(self):
        """The SAM2 predictor of the step, built once."""
        if self._predictor is None:
            from sslmedsam2.models.cache import find_weights
            from sslmedsam2.propagation.builder import build_predictor
            from sslmedsam2.propagation.device import resolve_device

            engine = self.engine
            weights = find_weights(engine.model, engine.checkpoint, engine.download, True, self.log)
            self._predictor = build_predictor(engine.spec, weights, resolve_device(engine.device), engine.image_size,
                                              engine.compile, self.log)
        return self._predictor


def engine_settings(options, device: str = "auto", channel: str = "MRI", axis: str = "axial") -> EngineSettings:
    """SAM2's settings from RefineOptions (sam2_*) and the workspace's channel and axis."""
    return EngineSettings(method="sam2", model=options.sam2_model or DEFAULT_MODEL,
                          checkpoint=Path(options.sam2_checkpoint) if options.sam2_checkpoint else None,
                          image_size=options.sam2_image_size, device=device, axis=axis,
                          intensity=IntensitySpec(modality="ct" if channel.upper() == "CT" else "mri"),
                          download=options.sam2_download)


def _key_slice_parameters(options) -> tuple[int, float]:
    return (options.key_slices if options.key_slices is not None else DEFAULT_PER_LABEL,
            options.min_continuity if options.min_continuity is not None else DEFAULT_MIN_CONTINUITY)


def check_options(options) -> None:
    """RefineOptions.check for --sam2-from-nnunet: everything that can fail before hours of training."""
    from sslmedsam2.models.cache import is_cached, manual_install_hint

    if options.fusion not in FUSIONS:
        raise UserError(f"--fusion {options.fusion}: choose one of {', '.join(FUSIONS)}")
    check_parameters(*_key_slice_parameters(options), per_label_option="--key-slices")
    engine = engine_settings(options).check()
    spec = engine.spec
    if engine.checkpoint is None and not is_cached(spec) and not engine.download:
        raise UserError(f"{spec.name} weights are not downloaded and downloading is off; {manual_install_hint(spec)}")


def settings_for(options, device: str, channel: str, axis: str, log: Callable[[str], None] = print) -> Sam2Settings:
    """From RefineOptions (sam2_*, key_slices, min_continuity, fusion) and the workspace's channel and axis."""
    return Sam2Settings(engine_settings(options, device, channel, axis), *_key_slice_parameters(options),
                        options.fusion, log)


def _mean_confidence(rows: list[SliceConfidence], labels: set[int], n: int) -> np.ndarray:
    """Per slice, the mean confidence over `labels` (nan rows count as 0: no confidence claimed)."""
    total, count = np.zeros(n), np.zeros(n)
    for row in rows:
        if row.label in labels and 0 <= row.slice < n:
            total[row.slice] += 0.0 if math.isnan(row.confidence) else row.confidence
            count[row.slice] += 1
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def refine_case(ws: Workspace, case_id: str, prediction: Path, out_dir: Path, settings: Sam2Settings) -> dict:
    """One case: key slices -> SAM2 -> fused pseudo-label; returns what `<case>.json` records."""
    predicted = read_label_map(prediction)
    grid = SliceGrid.of(predicted, ws.axis)
    pred = np.ascontiguousarray(grid.to_slices(sitk.GetArrayFromImage(predicted)))
    n = len(pred)
    check_pair(prediction)
    nnunet_rows = read_confidence(confidence_path(prediction))
    label_values = sorted(ws.labels.values())
    keys = select_key_slices(pred, settings.per_label, settings.min_continuity, certainty_from_table(nnunet_rows),
                             label_values)
    seeds = seed_map(pred, keys)
    human = np.zeros(n, bool)
    kept = None
    if ws.cases[case_id].has_pseudo:
        vouched = human_slices(ws.review(case_id))[:n]
        human[: len(vouched)] = vouched
        if human.any():
            kept = grid.to_slices(sitk.GetArrayFromImage(read_label_map(ws.file(case_id, "pseudo"))))
            seeds[human] = kept[human]
    prompted = {int(v) for v in np.unique(seeds) if v != 0}
    seeds_path = out_dir / "seeds" / f"{case_id}.nii.gz"  # a record of the prompts, for the reader
    seeds_path.parent.mkdir(parents=True, exist_ok=True)
    write_image(grid.to_image(seeds), seeds_path)

    source = np.full(n, "nnunet", dtype=object)
    labels, rows = pred.copy(), list(nnunet_rows)
    if prompted:
        image = read_image(ws.file(case_id, "image"))
        check_same_grid(image, predicted, what=f"the prediction of case {case_id}")
        volume = SliceVolume.from_image(image, ws.axis, settings.engine.intensity, case_id)
        result = LocalSession(volume, settings.predictor()).propagate(planes_of(seeds))
        sam2 = result.labels.astype(pred.dtype)
        for label in set(label_values) - prompted:  # nobody prompted it: nnU-Net's voxels where SAM2 left background
            sam2[(pred == label) & (sam2 == 0)] = label
        source[:] = "sam2"
        if settings.fusion == "confidence":
            source[_mean_confidence(nnunet_rows, prompted, n) > _mean_confidence(result.confidence, prompted, n)] = "nnunet"
        won = source == "sam2"
        labels[won] = sam2[won]
        by_sam2 = {(r.slice, r.label): r for r in result.confidence}
        rows = [by_sam2.get((r.slice, r.label), r) if won[r.slice] and r.label in prompted else r for r in nnunet_rows]
    if kept is not None:
        labels[human] = kept[human]
    source[human] = "human"
    voxels = {(z, label): int((labels[z] == label).sum()) for z in range(n) for label in label_values}
    rows = [replace(r, present=voxels.get((r.slice, r.label), 0) > 0, voxels=voxels.get((r.slice, r.label), 0))
            for r in rows]
    record = {"case": case_id, "fusion": settings.fusion,
              "key_slices": {str(label): [k.slice for k in keys if k.label == label] for label in label_values},
              "prompted_labels": sorted(prompted), "human_slices": [int(z) for z in np.flatnonzero(human)],
              "sources": {s: int((source == s).sum()) for s in SOURCES}}
    out = grid.to_image(labels)
    target = out_dir / f"{case_id}.nii.gz"
    write_text(out_dir / f"{case_id}.json", json.dumps(record, indent=2))
    write_result(out, target, rows)  # the table, then the label map: a case with the complete pair is finished
    return record


def run_step(ws: Workspace, cases: list[str], predicted: Path, out_dir: Path, settings: Sam2Settings,
             should_stop: Callable[[], bool] = lambda: False,
             on_case: Callable[[int, int, str], None] = lambda i, n, case: None) -> dict:
    """Every case not finished yet (its label map in `out_dir`), stopping between cases when asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, case_id in enumerate(cases):
        if should_stop():
            raise Cancelled()
        if pair_state(out_dir / f"{case_id}.nii.gz") == "complete":
            continue
        on_case(i, len(cases), case_id)
        refine_case(ws, case_id, predicted / f"{case_id}.nii.gz", out_dir, settings)
    return round_sources(out_dir, cases)


def round_sources(out_dir: Path, cases: list[str]) -> dict:
    """What a round records: `sources` (slices won by sam2 / nnunet / kept human, over all cases) and
    `case_sources` (the same per case); each case's key slices are in `<case>.json`."""
    records = {c: json.loads((out_dir / f"{c}.json").read_bytes()) for c in cases}
    return {"sources": {s: sum(r["sources"][s] for r in records.values()) for s in SOURCES},
            "case_sources": {c: r["sources"] for c, r in records.items()}}
