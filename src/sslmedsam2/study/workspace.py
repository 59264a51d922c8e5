"""A study workspace on disk: a versioned JSON index and one folder per case. Every write is atomic.

WS/workspace.json             {"schema_version", "axis", "labels": {name: value}, "channel": ..., "cases": {...}}
WS/cases/<id>/image.nii.gz    the image
WS/cases/<id>/label.nii.gz    ground truth (optional; never written by a job)
WS/cases/<id>/pseudo.nii.gz   pseudo-label (optional)
WS/cases/<id>/eval.nii.gz     held-out ground truth, used only to score rounds (optional)
WS/cases/<id>/review.json     per-slice review state of the pseudo-label along the workspace axis
WS/refine/                    the refinement job (see sslmedsam2.refine)

What these files may hold is checked in sslmedsam2.study.index, once, when a workspace is opened.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import atomic_dir, remove_stale_temporaries, stem, write_text
from sslmedsam2.errors import UserError
from sslmedsam2.labelmap.confidence import check_pair, read_confidence
from sslmedsam2.study.index import (SCHEMA_VERSION, check_case_id, check_review_length, check_settings,
                                    read_index, read_states)
from sslmedsam2.study.review import SliceState, states_from_confidence
from sslmedsam2.volume import check_same_grid, read_image, read_label_map, slice_axis, write_image
from sslmedsam2.volume.io import check_geometry_fits

INDEX = "workspace.json"
LOCK = ".workspace.lock"
LOCK_TIMEOUT_S = 120
FILES = {"image": "image.nii.gz", "label": "label.nii.gz", "pseudo": "pseudo.nii.gz", "eval": "eval.nii.gz"}


@dataclass
class Case:
    id: str
    has_label: bool = False
    has_pseudo: bool = False
    has_eval: bool = False
    missing: tuple[str, ...] = ()  # names of the case's files that the index lists but that are not on disk


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

    @property
    def refine_dir(self) -> Path:
        return self.root / "refine"

    # --- persistence -------------------------------------------------------------------------------------------
    def save(self) -> None:
        data = {"schema_version": SCHEMA_VERSION, "axis": self.axis, "labels": self.labels, "channel": self.channel,
                "cases": {c.id: {"label": c.has_label, "pseudo": c.has_pseudo, "eval": c.has_eval}
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
            ws.cases[case_id] = Case(case_id, has["label"], has["pseudo"], has["eval"], missing)
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


def add_case(ws: Workspace, image_path: Path, label: Path | None = None, pseudo: Path | None = None,
             eval_label: Path | None = None, case_id: str | None = None, review_from: Path | None = None,
             states: list[SliceState] | None = None, allow_uneven: bool = False) -> Case:
    """Check everything first, then copy; a failed add changes nothing. `states`: the pseudo-label's review
    states (instead of `review_from`)."""
    case_id = check_case_id(stem(Path(image_path)) if case_id is None else case_id)
    if case_id in ws.cases:
        raise UserError(f"case {case_id} is already in the workspace")
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
        n = int(sitk.GetArrayViewFromImage(image).shape[slice_axis(image, ws.axis)])
        if review_from is not None:
            states = _review_states(Path(review_from), n, Path(pseudo))
        elif states is not None and len(states) != n:
            raise UserError(f"{len(states)} review states for an image of {n} slices")
        states = states or [SliceState.UNREVIEWED] * n
    with ws.locked() as current:
        if case_id in current.cases:
            raise UserError(f"case {case_id} is already in the workspace")
        found = set().union(*(_label_values(m) for m in maps.values())) if maps else set()
        if current.labels:
            unknown = sorted(found - set(current.labels.values()))
            if unknown:
                raise UserError(f"label values {unknown} are not among the workspace's labels {current.labels}")
        else:
            current.labels = {f"label_{v}": v for v in sorted(found)}
        (current.root / "cases").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(current.root / "cases")
        # a folder left by an add that died before updating the index is not a case: it is replaced
        with atomic_dir(current.case_dir(case_id)) as folder:
            write_image(image, folder / FILES["image"])
            for kind, label_map in maps.items():
                write_image(label_map, folder / FILES[kind])
            if states is not None:
                write_text(folder / "review.json", json.dumps({"axis": current.axis, "states": [s.value for s in states]}) + "\n")
        case = Case(case_id, "label" in maps, "pseudo" in maps, "eval" in maps)
        current.cases[case_id] = case
        current.save()
    return case
