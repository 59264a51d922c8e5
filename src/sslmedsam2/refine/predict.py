"""`sslmedsam2 predict WS IMAGE -o OUTPUT`: a new image segmented by the workspace's latest refined nnU-Net;
`predict WS --input DIR|LIST -o OUTDIR`: a cohort of them, one shard per job (sslmedsam2.cohort), the model loaded
once per process.

Reads the workspace, writes nothing into it (it may be read-only or shared); nnU-Net's input goes to a temporary
folder, the label map to OUTPUT (atomically, last) and the per-slice confidence from nnU-Net's softmax to OUTPUT's
name + .confidence.csv, so a prediction is reviewed in the same order as a propagation. In a cohort each case also
gets `<name>.case.json` (after the pair: the model and the pair's result id), so a resumed run skips exactly the
cases whose three files agree and were made by this model. The model's checkpoint, plans.json and dataset.json are
used only as refine recorded them (sslmedsam2.refine.checkpoints): a planted or altered file is refused in one line.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sslmedsam2.atomic import check_not_input, remove_stale_temporaries, stem, write_text
from sslmedsam2.cohort.cases import list_cases
from sslmedsam2.cohort.run import ShardRun, take_shard
from sslmedsam2.cohort.shards import sorted_cases
from sslmedsam2.cohort.status import CaseFiles, case_done, write_manifest
from sslmedsam2.errors import UserError
from sslmedsam2.jobs import Progress
from sslmedsam2.labelmap.pictures import draw_result, is_our_picture, overview_path
from sslmedsam2.study.workspace import Workspace

CASE_KIND = "predict case"


@dataclass
class TrainedModel:
    round: int
    configuration: str
    fold: str


def latest_model(ws: Workspace) -> TrainedModel:
    """The last finished round whose final checkpoint exists."""
    from sslmedsam2.refine import nnunet
    from sslmedsam2.refine.rounds import refine_status

    status = refine_status(ws)
    options = status.get("options") or {}
    if options:
        nnunet.use_folders(ws.refine_dir / "nnunet", create=False)
        for r in sorted((r["round"] for r in status.get("rounds", [])), reverse=True):
            folder = nnunet.model_folder(r, options["configuration"]) / f"fold_{options['fold']}"
            if (folder / "checkpoint_final.pth").is_file():
                return TrainedModel(r, options["configuration"], options["fold"])
    raise UserError(f"{ws.root}: no finished refinement round yet; run `sslmedsam2 refine {ws.root}` first")


def predict_image(ws: Workspace, image_path: Path, output: Path, device: str = "auto",
                  progress: bool = False, overwrite: bool = False, allow_uneven: bool = False) -> TrainedModel:
    """Segment `image_path` onto its own grid and write OUTPUT's `.confidence.csv` beside it (per slice along the
    workspace's axis and label, from nnU-Net's softmax: the table `propagate` writes, source `nnunet`); returns
    the model used. The label map appears last."""
    from sslmedsam2.labelmap.confidence import confidence_path
    from sslmedsam2.refine import nnunet
    from sslmedsam2.volume import read_image, write_image
    from sslmedsam2.volume.io import check_geometry_fits, check_output, check_table_output

    output = Path(output)
    check_output(output, (Path(image_path),), overwrite)
    check_table_output(confidence_path(output), (Path(image_path),), overwrite)
    picture = single_picture(output)
    if picture.exists() and not overwrite and not is_our_picture(picture):
        raise UserError(f"{picture} exists and was not written by sslmedsam2; pass --overwrite to replace it")
    model = latest_model(ws)
    from sslmedsam2.propagation.device import resolve_device  # torch: only once there is a model to run

    image = read_image(image_path, allow_uneven)
    check_geometry_fits(image, output, what=str(image_path))
    check_geometry_fits(image, Path("image.nii.gz"), what=str(image_path))  # nnU-Net reads it as NIfTI
    with tempfile.TemporaryDirectory(prefix="sslmedsam2-predict-") as tmp:
        source = Path(tmp) / "case_0000.nii.gz"
        write_image(image, source)
        with open(Path(tmp) / "nnunet.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            predictor = nnunet.load_predictor(model.round, model.configuration, model.fold,
                                              str(resolve_device(device)), progress=progress)
            _, labels = nnunet.write_with_confidence(predictor, source, output, ws.axis, reference=image)
    _draw(ws, image, labels, output.name, picture, model)
    return model


def single_picture(output: Path) -> Path:
    """The overview `predict IMAGE -o OUTPUT` draws beside OUTPUT: <name>.overview.png."""
    return Path(output).with_name(f"{stem(Path(output))}.overview.png")


def _draw(ws: Workspace, image, labels, name: str, target: Path, model: TrainedModel) -> None:
    """The prediction `labels` (an image) of the file `name`, in colour over `image`, into `target`."""
    draw_result(image, labels, target, f"{name}: the round {model.round} model's prediction", ws.axis,
                {v: n for n, v in ws.labels.items()}, ct=ws.channel.upper() == "CT")


@dataclass
class PredictCohortOptions:
    inputs: Path  # a folder of images, or a list file (one path a line)
    output: Path  # OUTDIR
    device: str = "auto"
    shard: tuple[int, int] | None = (1, 1)  # (I, N), 1-based; None: from the scheduler's array variables
    redo: bool = False  # recompute finished cases made by another model (else such a folder is refused)
    overwrite: bool = False  # replace files of the cases' output names that this tool did not write
    allow_uneven: bool = False


def model_record(model: TrainedModel) -> dict:
    """What a prediction depends on: the round's model and the digest refine recorded for its checkpoint."""
    from sslmedsam2.refine import checkpoints, nnunet

    manifest = nnunet.manifest_path()
    path = nnunet.model_folder(model.round, model.configuration) / f"fold_{model.fold}" / "checkpoint_final.pth"
    key = path.resolve().relative_to(manifest.parent.resolve()).as_posix()
    digests = sorted(checkpoints.read_manifest(manifest).get(key, ()))
    return {"round": model.round, "configuration": model.configuration, "fold": model.fold,
            "checkpoint_sha256": digests[0] if len(digests) == 1 else None}


def case_files(outdir: Path, image: Path) -> CaseFiles:
    """The label map `OUTDIR/<input file name>` (its table beside it) and `OUTDIR/<name>.case.json`."""
    return CaseFiles(image.name, image.name, f"{stem(image)}.case.json")


def _record(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _check_case_outputs(outdir: Path, image: Path, overwrite: bool) -> None:
    from sslmedsam2.labelmap.confidence import confidence_path
    from sslmedsam2.volume.io import check_output, check_table_output

    files = case_files(outdir, image)
    check_output(outdir / files.labels, (image,), overwrite)
    check_table_output(confidence_path(outdir / files.labels), (image,), overwrite)
    record = outdir / files.record
    if record.exists() and (_record(record) or {}).get("sslmedsam2") != CASE_KIND and not overwrite:
        raise UserError(f"{record} exists and was not written by `sslmedsam2 predict`; pass --overwrite to replace "
                        "it, or use another output folder")


def predict_cohort(ws: Workspace, options: PredictCohortOptions, log: Callable[[str], None] = print,
                   cases_bar: Progress | None = None, progress: bool = False) -> list[Path]:
    """Segment every unfinished case of this shard into OUTDIR with the latest model, loaded once; returns the label
    maps written. A case whose voxels cannot be read is recorded as failed and the shard goes on (a UserError at
    the end names the failed cases); a failure of the prediction or of a write stops the shard. Ctrl-C or a stop
    signal raises cohort.run.ShardInterrupted."""
    outdir = Path(options.output)
    every = sorted_cases(list_cases(options.inputs))
    check_not_input([outdir], [options.inputs, ws.root, *every])
    model = latest_model(ws)
    identity = model_record(model)
    shard, cases = take_shard(outdir, "predict", every, options.shard, options.overwrite, log, "input")
    outdir.mkdir(parents=True, exist_ok=True)
    done = {p.name for p in cases if case_done(outdir, case_files(outdir, p))}
    other = sorted(name for name in done
                   if (_record(outdir / case_files(outdir, Path(name)).record) or {}).get("model") != identity)
    if other and not options.redo:
        raise UserError(f"{outdir} holds {len(other)} finished case(s) predicted by another model ({other[0]}); "
                        f"use another output folder, or --redo to predict them with round {model.round}'s model")
    if remove_stale_temporaries(outdir):
        log("removed temporary files left by an interrupted run")
    todo = [p for p in cases if p.name not in done or p.name in other]
    for image in todo:
        _check_case_outputs(outdir, image, options.overwrite)
    write_manifest(outdir, "predict", options.inputs, [case_files(outdir, p) for p in every], shard)
    if len(todo) < len(cases):
        log(f"resuming: {len(cases) - len(todo)} of {len(cases)} cases of this shard are already done")
    by_name = {p.name: p for p in cases}
    run = ShardRun(outdir, shard, list(by_name),
                   lambda name: case_done(outdir, case_files(outdir, by_name[name])), cases_bar)
    written: list[Path] = []
    if not todo:
        return written
    try:
        _predict_cases(ws, model, identity, options, run, todo, written, log, progress)
    except KeyboardInterrupt as exc:
        raise run.interrupted(exc) from None
    except BaseException as exc:
        run.settle(exc)
        raise
    failure = run.failure()
    if failure is not None:
        raise failure
    return written


def _predict_cases(ws: Workspace, model: TrainedModel, identity: dict, options: PredictCohortOptions, run: ShardRun,
                   todo: list[Path], written: list[Path], log: Callable[[str], None], progress: bool) -> None:
    from sslmedsam2.propagation.device import resolve_device
    from sslmedsam2.refine import nnunet
    from sslmedsam2.volume import read_image, write_image
    from sslmedsam2.volume.io import check_geometry_fits

    outdir = Path(options.output)
    with tempfile.TemporaryDirectory(prefix="sslmedsam2-predict-") as tmp:
        with open(Path(tmp) / "nnunet.log", "w", encoding="utf-8") as nnunet_log, contextlib.redirect_stdout(nnunet_log):
            predictor = nnunet.load_predictor(model.round, model.configuration, model.fold,
                                              str(resolve_device(options.device)), progress=progress)
            run.begin(len(todo))
            for path in todo:
                files = case_files(outdir, path)
                run.started(path.name)
                began = time.perf_counter()
                try:
                    image = read_image(path, options.allow_uneven)
                    check_geometry_fits(image, outdir / files.labels, what=str(path))
                    check_geometry_fits(image, Path("image.nii.gz"), what=str(path))  # nnU-Net reads it as NIfTI
                except UserError as exc:  # this case's own fault: the others go on
                    log(f"{path.name}: failed ({run.fail(path.name, exc)}); going on with the next case")
                    continue
                source = Path(tmp) / "case_0000.nii.gz"
                write_image(image, source)
                result, labels = nnunet.write_with_confidence(predictor, source, outdir / files.labels, ws.axis,
                                                              reference=image)
                _draw(ws, image, labels, files.labels, overview_path(outdir, path), model)
                seconds = round(time.perf_counter() - began, 2)
                write_text(outdir / files.record, json.dumps(
                    {"sslmedsam2": CASE_KIND, "input": str(path.resolve()), "result": result, "model": identity,
                     "seconds": seconds}, indent=2) + "\n")
                run.done(path.name, seconds)
                written.append(outdir / files.labels)
                log(f"{path.name}: {seconds:.1f} s -> {outdir / files.labels}")
