"""A study workspace on disk: a versioned JSON index and one folder per case. Every write is atomic.

WS/workspace.json             {"schema_version", "axis", "labels": {name: value}, "channel": ..., "cases": {...}}
WS/cases/<id>/image.nii.gz    the image
WS/cases/<id>/label.nii.gz    ground truth (optional; never written by a job)
WS/cases/<id>/pseudo.nii.gz   pseudo-label (optional)
WS/cases/<id>/eval.nii.gz     held-out ground truth, used only to score rounds (optional)
WS/cases/<id>/review.json     per-slice review state of the pseudo-label along the workspace axis
WS/cases/<id>/pseudo.confidence.csv   the pseudo-label's confidence table, when it came with one (--review-from)
WS/refine/                    the refinement job (see sslmedsam2.refine)

What these files may hold is checked in sslmedsam2.study.index, once, when a workspace is opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import atomic_dir, link_or_copy, remove_stale_temporaries, stem, write_text
from sslmedsam2.errors import UserError
from sslmedsam2.labelmap.confidence import check_pair, read_confidence
from sslmedsam2.provenance import table_mark
from sslmedsam2.study.index import (DIGEST_KEY, SCHEMA_VERSION, check_case_id, check_review_length, check_settings,
                                    read_index, read_states)
from sslmedsam2.study.review import SliceState, states_from_confidence
from sslmedsam2.volume import check_same_grid, read_image, read_label_map, slice_axis, write_image
from sslmedsam2.volume.io import check_geometry_fits

INDEX = "workspace.json"
LOCK = ".workspace.lock"
LOCK_TIMEOUT_S = 120
FILES = {"image": "image.nii.gz", "label": "label.nii.gz", "pseudo": "pseudo.nii.gz", "eval": "eval.nii.gz"}
TABLE = "pseudo.confidence.csv"  # the pseudo-label's confidence table (optional)


@dataclass
class Case:
    id: str
    has_label: bool = False
    has_pseudo: bool = False
    has_eval: bool = False
    missing: tuple[str, ...] = ()  # names of the case's files that the index lists but that are not on disk
    image_digest: str | None = None  # image_digest() of its image; None in workspaces older than the digest


@dataclass
class Workspace:
    root: Path
    axis: str = "axial"
    labels: dict[str, int] = field(default_factory=dict)
    channel: str = "MRI"
    cases: dict[str, Case] = field(default_factory=dict)

    # --- paths -------------------------------------------------------------------------------------------------
    def case_dir(self, case_id: str) -> Path:
        return self.root / "cases" / case_id

    def file(self, case_id: str, kind: str) -> Path:
        return self.case_dir(case_id) / FILES[kind]

    def review_path(self, case_id: str) -> Path:
        return self.case_dir(case_id) / "review.json"

    def table(self, case_id: str) -> Path | None:
        """The pseudo-label's confidence table, if the case has one."""
        path = self.case_dir(case_id) / TABLE
        return path if self.cases[case_id].has_pseudo and path.is_file() else None

    @property
    def refine_dir(self) -> Path:
        return self.root / "refine"

    # --- persistence -------------------------------------------------------------------------------------------
    def save(self) -> None:
        data = {"schema_version": SCHEMA_VERSION, "axis": self.axis, "labels": self.labels, "channel": self.channel,
                "cases": {c.id: {"label": c.has_label, "pseudo": c.has_pseudo, "eval": c.has_eval,
                                 **({DIGEST_KEY: c.image_digest} if c.image_digest else {})}
                          for c in sorted(self.cases.values(), key=lambda c: c.id)}}
        write_text(self.root / INDEX, json.dumps(data, indent=2) + "\n")

    @classmethod
    def open(cls, root: Path | str, allow_missing: bool = False) -> "Workspace":
        """The workspace at `root`, its index and review files checked (sslmedsam2.study.index): a damaged or
        hand-edited one raises a one-line UserError. A case whose files were deleted raises one too, naming the
        cases, unless `allow_missing`: then `Case.missing` lists them (for `workspace status` and `review`)."""
        root = Path(root)
        index = root / INDEX
        if not index.is_file():
            raise UserError(f"{root}: not a workspace (no {INDEX}); create one with `sslmedsam2 workspace init {root}`")
        axis, labels, channel, cases = read_index(index)
        ws = cls(root, axis, labels, channel)
        for case_id, has in cases.items():
            kinds = ["image"] + [kind for kind in ("label", "pseudo", "eval") if has[kind]]
            missing = tuple(FILES[kind] for kind in kinds if not ws.file(case_id, kind).is_file())
            ws.cases[case_id] = Case(case_id, has["label"], has["pseudo"], has["eval"], missing, has[DIGEST_KEY])
            review = ws.review_path(case_id)
            if review.is_file():
                states = read_states(review, axis)
                if FILES["image"] not in missing:
                    check_review_length(review, states, ws.file(case_id, "image"), axis)
        if not allow_missing:
            ws.check_complete()
        return ws

    def check_complete(self, case_ids: list[str] | None = None) -> None:
        """Raise a one-line UserError naming each case (of `case_ids`, default all) whose files are missing."""
        chosen = sorted(self.cases) if case_ids is None else case_ids
        incomplete = [self.cases[c] for c in chosen if self.cases[c].missing]
        if incomplete:
            listed = "; ".join(f"case {c.id} has no {', '.join(c.missing)}" for c in incomplete)
            raise UserError(f"{self.root}: files missing: {listed} (deleted?); restore them, or remove "
                            f"{'the case' if len(incomplete) == 1 else 'those cases'} from {INDEX}")

    @contextlib.contextmanager
    def locked(self) -> Iterator["Workspace"]:
        """Serialise changes between processes; yields the index as it is now on disk (another process may have
        added cases since this one was opened) and keeps this object in step with it."""
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(self.root / LOCK), timeout=LOCK_TIMEOUT_S):
                current = Workspace.open(self.root, allow_missing=True)  # the caller's open decided about those
                yield current
                self.labels, self.cases = current.labels, current.cases
        except Timeout:
            raise UserError(f"{self.root}: another process has held the workspace lock for {LOCK_TIMEOUT_S} s") from None
        except PermissionError as exc:
            raise UserError(f"cannot change workspace {self.root}: {exc.strerror} (read-only?)") from None

    # --- review state ------------------------------------------------------------------------------------------
    def review(self, case_id: str) -> list[SliceState]:
        """The case's per-slice review states; [] when it has no review file."""
        path = self.review_path(case_id)
        if not path.is_file():
            return []
        return read_states(path, self.axis)

    def set_review(self, case_id: str, states: list[SliceState]) -> None:
        write_text(self.review_path(case_id), json.dumps({"axis": self.axis, "states": [s.value for s in states]}) + "\n")


def init_workspace(root: Path | str, labels: dict[str, int] | None = None, axis: str = "axial",
                   channel: str = "MRI") -> Workspace:
    """Create an empty workspace at `root` (refused where one exists, or for bad labels, axis or channel)."""
    root = Path(root)
    if (root / INDEX).exists():
        raise UserError(f"{root} is already a workspace")
    axis, labels, channel = check_settings(axis, dict(labels or {}), channel, "")
    root.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root, axis, labels, channel)
    ws.save()
    return ws


def find_workspace(*paths: Path) -> Path | None:
    """The workspace a path lies in: the nearest folder above the first of `paths` that has one, holding a
    workspace.json; None when none does."""
    for path in paths:
        found = next((p for p in Path(path).resolve().parents if (p / INDEX).is_file()), None)
        if found is not None:
            return found
    return None


def parse_labels(items: list[str]) -> dict[str, int]:
    """["liver=1", "spleen=4"] -> {"liver": 1, "spleen": 4}."""
    labels = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value.isdecimal():
            raise UserError(f"--label {item!r}: write NAME=VALUE, e.g. liver=1")
        labels[name] = int(value)
    return labels


def _label_values(image: sitk.Image) -> set[int]:
    return {int(v) for v in np.unique(sitk.GetArrayViewFromImage(image)) if v}


def _review_states(review_from: Path, n: int, pseudo: Path) -> list[SliceState]:
    """A propagation's drawn slices as seeds, from its confidence table, which must be this image's and, where the
    pseudo-label is this tool's result, belong to it."""
    check_pair(pseudo, review_from)
    try:
        rows = read_confidence(review_from)
    except (OSError, UnicodeDecodeError, KeyError, ValueError, TypeError):
        raise UserError(f"--review-from {review_from}: not a confidence table (.confidence.csv of propagate or "
                        "pseudolabel)") from None
    slices = {r.slice for r in rows}
    if not rows or slices != set(range(n)):
        count = max(slices) + 1 if slices else 0
        raise UserError(f"--review-from {review_from}: the table covers {count} slices, the image has {n} along the "
                        "workspace axis; it belongs to another case or axis")
    return states_from_confidence(rows, n)


def image_digest(image: sitk.Image) -> str:
    """SHA-256 of an image's grid (size, spacing, origin, direction as the NIfTI copy stores them: float32, to
    1e-4) and voxel values (as float64: the same values stored in another type digest the same)."""
    digest = hashlib.sha256()
    geometry = [tuple(round(float(np.float32(v)), 4) + 0.0 for v in get())
                for get in (image.GetSpacing, image.GetOrigin, image.GetDirection)]
    digest.update(repr((image.GetSize(), image.GetNumberOfComponentsPerPixel(), *geometry)).encode())
    for plane in sitk.GetArrayViewFromImage(image):
        digest.update(np.ascontiguousarray(plane, dtype=np.float64).tobytes())
    return digest.hexdigest()


@dataclass
class NewCase:
    """A case checked and read, ready to be written into a workspace (`prepare_case`, then `commit_case`)."""

    id: str
    image: sitk.Image
    digest: str
    maps: dict[str, sitk.Image]  # label, pseudo, eval
    states: list[SliceState] | None
    table: Path | None  # the pseudo-label's confidence table, copied into the case


def prepare_case(ws: Workspace, image_path: Path, label: Path | None = None, pseudo: Path | None = None,
                 eval_label: Path | None = None, case_id: str | None = None, review_from: Path | None = None,
                 states: list[SliceState] | None = None, allow_uneven: bool = False) -> NewCase:
    """Read and check a case's files (grids, review table) without touching the workspace."""
    case_id = check_case_id(stem(Path(image_path)) if case_id is None else case_id)
    if (review_from is not None or states is not None) and pseudo is None:
        raise UserError("--review-from gives the review state of a pseudo-label: add --pseudo too")
    image = read_image(image_path, allow_uneven)
    check_geometry_fits(image, ws.file(case_id, "image"), what=str(image_path))
    maps = {}
    for kind, path in (("label", label), ("pseudo", pseudo), ("eval", eval_label)):
        if path is None:
            continue
        label_map = read_label_map(path)
        check_same_grid(image, label_map, what=f"{kind} {Path(path).name}")
        maps[kind] = label_map
    if "pseudo" in maps:
        states = _checked_states(ws, image, Path(pseudo), review_from, states)
    return NewCase(case_id, image, image_digest(image), maps, states, None if review_from is None else Path(review_from))


def _checked_states(ws: Workspace, image: sitk.Image, pseudo: Path, review_from: Path | None,
                    states: list[SliceState] | None) -> list[SliceState]:
    n = int(sitk.GetArrayViewFromImage(image).shape[slice_axis(image, ws.axis)])
    if review_from is not None:
        return _review_states(Path(review_from), n, pseudo)
    if states is not None and len(states) != n:
        raise UserError(f"{len(states)} review states for an image of {n} slices")
    return states or [SliceState.UNREVIEWED] * n


def _check_values(current: Workspace, maps: dict[str, sitk.Image]) -> None:
    """The label maps' values are the workspace's labels (a workspace without labels takes them from the maps)."""
    found = set().union(*(_label_values(m) for m in maps.values())) if maps else set()
    if current.labels:
        unknown = sorted(found - set(current.labels.values()))
        if unknown:
            raise UserError(f"label values {unknown} are not among the workspace's labels {current.labels}")
    else:
        current.labels = {f"label_{v}": v for v in sorted(found)}


def duplicate_of(current: Workspace, digest: str) -> str | None:
    """The case whose image has these voxels and grid, if any (digests missing from an older index are computed
    and kept, to be saved with the next change)."""
    for case in sorted(current.cases.values(), key=lambda c: c.id):
        if case.image_digest is None and current.file(case.id, "image").is_file():
            case.image_digest = image_digest(read_image(current.file(case.id, "image")))
        if case.image_digest == digest:
            return case.id
    return None


def _write_pseudo(folder: Path, new: NewCase, axis: str) -> None:
    """The pseudo-label (carrying its table's result id, so that the two stay one result), its table, its review."""
    result = table_mark(new.table).result if new.table is not None else None
    write_image(new.maps["pseudo"], folder / FILES["pseudo"], result=result)
    if new.table is not None:
        write_text(folder / TABLE, new.table.read_text(encoding="utf-8"))
    write_text(folder / "review.json", json.dumps({"axis": axis, "states": [s.value for s in new.states]}) + "\n")


def commit_case(ws: Workspace, new: NewCase) -> Case:
    """Write a prepared case: refused (nothing changed) when its id is taken or its image (voxels and grid) is
    already the image of another case."""
    duplicate_of(ws, new.digest)  # outside the lock: the digests an older index lacks are computed once, here
    with ws.locked() as current:
        for case in current.cases.values():  # a case's image never changes: its digest holds
            if case.image_digest is None and case.id in ws.cases:
                case.image_digest = ws.cases[case.id].image_digest
        if new.id in current.cases:
            raise UserError(f"case {new.id} is already in the workspace (to replace its pseudo-label: "
                            f"`sslmedsam2 workspace update {current.root} {new.id} --pseudo FILE`)")
        _check_values(current, new.maps)
        twin = duplicate_of(current, new.digest)
        if twin is not None:
            raise UserError(f"its image is already in the workspace as case {twin} (same voxels and grid); an image "
                            "is added once")
        (current.root / "cases").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(current.root / "cases")
        # a folder left by an add that died before updating the index is not a case: it is replaced
        with atomic_dir(current.case_dir(new.id)) as folder:
            write_image(new.image, folder / FILES["image"])
            for kind, label_map in new.maps.items():
                if kind != "pseudo":
                    write_image(label_map, folder / FILES[kind])
            if "pseudo" in new.maps:
                _write_pseudo(folder, new, current.axis)
        case = Case(new.id, "label" in new.maps, "pseudo" in new.maps, "eval" in new.maps, image_digest=new.digest)
        current.cases[new.id] = case
        current.save()
    return case


def add_case(ws: Workspace, image_path: Path, label: Path | None = None, pseudo: Path | None = None,
             eval_label: Path | None = None, case_id: str | None = None, review_from: Path | None = None,
             states: list[SliceState] | None = None, allow_uneven: bool = False) -> Case:
    """Check everything first, then copy; a failed add changes nothing. `states`: the pseudo-label's review
    states (instead of `review_from`). An id already in the workspace, or an image already in it under another
    id, is refused (a pseudo-label is replaced with `update_case`, explicitly)."""
    case_id = check_case_id(stem(Path(image_path)) if case_id is None else case_id)
    if case_id in ws.cases:
        raise UserError(f"case {case_id} is already in the workspace (to replace its pseudo-label: "
                        f"`sslmedsam2 workspace update {ws.root} {case_id} --pseudo FILE`)")
    return commit_case(ws, prepare_case(ws, image_path, label, pseudo, eval_label, case_id, review_from, states,
                                        allow_uneven))


def update_case(ws: Workspace, case_id: str, pseudo: Path, review_from: Path | None = None,
                states: list[SliceState] | None = None) -> tuple[Case, dict[str, int]]:
    """Replace a case's pseudo-label (or give it one): the review states start again (from `review_from`'s seeds,
    `states`, else unreviewed), since nobody has looked at the new one. The case's folder is swapped in one step,
    so a failure or a kill leaves the old pseudo-label or the new one. Returns the case and the counts of the
    review states that were dropped (those a person had set)."""
    if case_id not in ws.cases:
        raise UserError(f"case {case_id!r} is not in the workspace; add it with `sslmedsam2 workspace add`")
    ws.check_complete([case_id])
    image = read_image(ws.file(case_id, "image"))
    label_map = read_label_map(pseudo)
    check_same_grid(image, label_map, what=f"pseudo {Path(pseudo).name}")
    new = NewCase(case_id, image, "", {"pseudo": label_map},
                  _checked_states(ws, image, Path(pseudo), review_from, states),
                  None if review_from is None else Path(review_from))
    with ws.locked() as current:
        if case_id not in current.cases:
            raise UserError(f"case {case_id!r} was removed from the workspace meanwhile")
        current.check_complete([case_id])
        _check_values(current, new.maps)
        dropped = {s.value: n for s, n in _counts(current.review(case_id)).items()
                   if s not in (SliceState.UNREVIEWED,)} if current.cases[case_id].has_pseudo else {}
        case = current.cases[case_id]
        remove_stale_temporaries(current.root / "cases")
        with atomic_dir(current.case_dir(case_id)) as folder:
            for kind in ("image", "label", "eval"):
                if kind == "image" or getattr(case, f"has_{kind}"):
                    link_or_copy(current.file(case_id, kind), folder / FILES[kind])
            _write_pseudo(folder, new, current.axis)
        case.has_pseudo = True
        current.save()
    return case, dropped


def _counts(states: list[SliceState]) -> dict[SliceState, int]:
    counts: dict[SliceState, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return counts
