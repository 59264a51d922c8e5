"""Few-shot and study files from and to the scene: supports and queries exported for `pseudolabel`, its ranking,
cases added to a workspace and refined rounds found in it. Scene access only; the runs are in logic.py."""

from __future__ import annotations

from pathlib import Path

from SSLMedSAM2Lib import scene_io
from SSLMedSAM2Lib.launch import import_engine
from SSLMedSAM2Lib.temporary import TEMPORARY


def chosen(path: str) -> bool:
    """A path field holds a path (an empty ctkPathLineEdit reads as "" or ".")."""
    return bool(path) and path != "."


def export_supports(segmentations, found: list[str], folder: Path) -> tuple[str, str]:
    """Each support segmentation with the volume it was drawn on, into `folder` (the caller deletes it); label values
    follow segment names, so that "liver" has the same value in every support (the engine refuses supports whose
    labels differ)."""
    folder = Path(folder)
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


def export_queries(volumes, nodes: dict[str, object], folder: Path) -> str:
    """The query volumes into `folder` (the caller deletes it); `nodes` learns which file is which scene volume."""
    folder = Path(folder)
    for volume in volumes:
        name = f"{scene_io.file_name(volume)}.nrrd"
        scene_io.export_volume(volume, folder / name)
        nodes[name] = volume
    return str(folder)


def least_trustworthy(output: Path) -> str | None:
    """The query file a few-shot run ranks first for review."""
    import_engine()
    from sslmedsam2.fewshot.ranking import least_trustworthy_case

    return least_trustworthy_case(Path(output))


class AlreadyInStudy(Exception):
    """The volume is already a case of the study (same voxels and grid): replacing its pseudo-label is the user's
    call (`add_to_study(..., replace=True)`)."""

    def __init__(self, case_id: str) -> None:
        super().__init__(f"this volume is already case {case_id} of the study")
        self.case = case_id


def add_to_study(workspace: Path, volume, segmentation, axis: str, states, replace: bool = False) -> str:
    """Image, segmentation (as pseudo-label) and review states (or None) into the workspace; returns the case id.
    A volume already in the study raises AlreadyInStudy, unless `replace`: then that case's pseudo-label and review
    states become these (refused while a refine job runs on the workspace)."""
    import_engine()
    from sslmedsam2.errors import UserError
    from sslmedsam2.refine.events import job_running
    from sslmedsam2.study.workspace import Workspace, add_case, duplicate_of, image_digest, init_workspace, update_case
    from sslmedsam2.volume import read_image

    ids = scene_io.segment_ids(segmentation)
    if not (workspace / "workspace.json").is_file():
        names = [segmentation.GetSegmentation().GetSegment(sid).GetName() for sid in ids]
        init_workspace(workspace, {name: i + 1 for i, name in enumerate(names)}, axis=axis)
    ws = Workspace.open(workspace)
    folder = TEMPORARY.make("SSLMedSAM2-study-")
    try:
        image = scene_io.export_volume(volume, folder / "image.nrrd")
        labels, _ = scene_io.export_segments(segmentation, volume, folder / "labels.nrrd")
        states = None if states is None else list(states)
        twin = duplicate_of(ws, image_digest(read_image(image)))
        if twin is not None:
            if not replace:
                raise AlreadyInStudy(twin)
            if job_running(ws.refine_dir):
                raise UserError(f"a refine job is running on {workspace}; stop it before replacing a pseudo-label")
            update_case(ws, twin, labels, states=states)
            return twin
        case_id = "".join(c if c.isalnum() or c in "._-" else "_" for c in volume.GetName()) or "case"
        base, n = case_id, 1
        while case_id in ws.cases:
            n += 1
            case_id = f"{base}_{n}"
        # the review states go in with the case, in the same locked change of the workspace
        add_case(ws, image, pseudo=labels, case_id=case_id, states=states)
    finally:
        TEMPORARY.remove(folder)
    return case_id


def latest_refined(workspace: Path) -> tuple[Path, Path, str, str, list]:
    """The latest round's pseudo-label of the workspace's first case without ground truth: (image, label map,
    case, round name, review states)."""
    import_engine()
    from sslmedsam2.study.workspace import Workspace

    ws = Workspace.open(workspace)
    rounds = sorted((ws.refine_dir / "rounds").glob("round_*/pseudo"))
    cases = sorted(rounds[-1].glob("*.nii.gz")) if rounds else []
    if not cases:
        raise RuntimeError("no finished refinement round yet")
    case = cases[0].name[: -len(".nii.gz")]
    return ws.file(case, "image"), cases[0], case, rounds[-1].parent.name, ws.review(case)


def workspace_labels(workspace: Path) -> tuple[dict[str, int], str]:
    """The workspace's labels ({name: value}) and slice axis, for a prediction of its model."""
    import_engine()
    from sslmedsam2.study.workspace import Workspace

    ws = Workspace.open(workspace)
    if not ws.labels:
        raise ValueError(f"The workspace {workspace} has no labels yet: add a case first.")
    return dict(ws.labels), ws.axis
