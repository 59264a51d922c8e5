"""`workspace import WS DIR`: a dataset folder into a workspace, case by case, with a report.

DIR is one of:
- an nnU-Net raw dataset: dataset.json, imagesTr/<case>_0000<ending> with labelsTr/<case><ending> (ground truth,
  or what `labels_as` says), imagesTs/<case>_0000<ending> (unlabelled; with labelsTs/, those are held-out labels);
- a folder with images/ and labels/ (or `labels_folder`), matched by file name without suffix;
- a folder of images (labels from `labels_folder` only).
Each case is added as `workspace add` adds one (checked first, written atomically); an import that stops (a kill, a
full disk) is resumed by running it again: cases already in the workspace with the same image are skipped. A case
whose image is already in the workspace under another id, an image that cannot be read, a label without an image
or on another grid are skipped, each with its reason.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sslmedsam2.atomic import full_suffix, stem
from sslmedsam2.errors import UserError
from sslmedsam2.labelmap.confidence import confidence_path
from sslmedsam2.study.index import RESERVED_LABELS, TOP_LABEL, check_case_id
from sslmedsam2.study.workspace import Workspace, commit_case, duplicate_of, prepare_case
from sslmedsam2.volume.io import IMAGE_SUFFIXES

LABELS_AS = ("label", "eval", "pseudo")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_WHAT = {"label": "ground truth", "eval": "held-out label", "pseudo": "pseudo-label"}


@dataclass
class Found:
    """A case found in the dataset folder: its image and the label map to add as `kind` (None: unlabelled)."""

    name: str
    image: Path | None
    label: Path | None = None
    kind: str | None = None
    table: Path | None = None  # a pseudo-label's confidence table (review state from its seeds)


@dataclass
class ImportReport:
    layout: str
    added: list[tuple[str, str]] = field(default_factory=list)  # (case, what it has)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (case or file, why)
    notes: list[str] = field(default_factory=list)


def _is_image(path: Path) -> bool:
    return path.is_file() and full_suffix(path).lower() in IMAGE_SUFFIXES


def _files(folder: Path, ending: str | None) -> tuple[dict[str, Path], list[str]]:
    """{name without suffix: image file} of a folder, and the names of what is not an image (hidden files and
    confidence tables aside)."""
    images, other = {}, []
    if not folder.is_dir():
        return images, other
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if _is_image(path) and (ending is None or path.name.endswith(ending)):
            images[path.name[: -len(ending)] if ending else stem(path)] = path
        elif not path.name.endswith(".confidence.csv"):
            other.append(path.name)
    return images, other


def _dataset_json(folder: Path) -> dict:
    path = folder / "dataset.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path}: not JSON") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a JSON object expected")
    channels = data.get("channel_names", data.get("modality"))
    if isinstance(channels, dict) and len(channels) > 1:
        raise UserError(f"{path}: {len(channels)} channels ({', '.join(map(str, channels.values()))}); a workspace "
                        "holds one image per case")
    return data


def dataset_labels(data: dict, where: Path) -> dict[str, int]:
    """dataset.json's labels as {name: value}, without background and ignore; region-based labels are refused."""
    labels = data.get("labels")
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise UserError(f"{where}: labels {{name: value}} expected")
    out = {}
    for name, value in labels.items():
        if name in RESERVED_LABELS or value == 0:
            continue
        if type(value) is not int or not 1 <= value <= TOP_LABEL:
            raise UserError(f"{where}: label {name!r}: {value!r} is not a label value (region-based labels are not "
                            "supported)")
        out[str(name)] = value
    return out


def _nnunet(folder: Path, labels_as: str, report: ImportReport) -> tuple[list[Found], dict[str, int]]:
    data = _dataset_json(folder)
    labels = dataset_labels(data, folder / "dataset.json")
    ending = data.get("file_ending") if isinstance(data.get("file_ending"), str) else None
    found: list[Found] = []
    for images_dir, labels_dir, kind in (("imagesTr", "labelsTr", labels_as), ("imagesTs", "labelsTs", "eval")):
        images, other = _files(folder / images_dir, ending)
        maps, other_labels = _files(folder / labels_dir, ending)
        report.skipped += [(f"{images_dir}/{n}", "not an image file") for n in other]
        report.skipped += [(f"{labels_dir}/{n}", "not an image file") for n in other_labels]
        cases: dict[str, Path] = {}
        for name, path in images.items():
            match = _CHANNEL.match(name)
            if not match:
                report.skipped.append((f"{images_dir}/{path.name}", "not named CASE_0000 (nnU-Net's channel suffix)"))
            elif match["channel"] != "0000":
                report.skipped.append((f"{images_dir}/{path.name}", f"channel {match['channel']}: a workspace holds "
                                       "one image per case"))
            else:
                cases[match["case"]] = path
        for name, path in cases.items():
            label = maps.get(name)
            if label is None and images_dir == "imagesTr":
                report.skipped.append((name, f"no label {labels_dir}/{name}{ending or '.nii.gz'} (an image without "
                                       "a label belongs in imagesTs)"))
                continue
            found.append(Found(name, path, label, kind if label is not None else None,
                               _table(label) if kind == "pseudo" else None))
        report.skipped += [(f"{labels_dir}/{maps[n].name}", "no image of that case")
                           for n in sorted(set(maps) - set(cases))]
    return found, labels


def _table(label: Path | None) -> Path | None:
    table = None if label is None else confidence_path(label)
    return table if table is not None and table.is_file() else None


def _pairs(images_dir: Path, labels_dir: Path | None, labels_as: str, report: ImportReport) -> list[Found]:
    images, other = _files(images_dir, None)
    maps, other_labels = _files(labels_dir, None) if labels_dir is not None else ({}, [])
    report.skipped += [(n, "not an image file") for n in other if (images_dir / n).is_file()]
    found, used = [], set()
    for name, path in images.items():
        case = name[:-5] if name.endswith("_0000") and name not in maps else name  # nnU-Net's channel suffix
        label = maps.get(case)
        used.add(case)
        found.append(Found(case, path, label, labels_as if label is not None else None,
                           _table(label) if labels_as == "pseudo" else None))
    names = {f.name for f in found}
    for name in sorted(set(maps) - used):
        if any(name.startswith(f"{n}.") for n in names):  # pseudolabel's NAME.prob_1, NAME.uncertainty
            continue
        report.skipped.append((maps[name].name, f"a label map in {labels_dir} without an image of that name"))
    ignored = [n for n in other_labels if not n.endswith((".json", ".csv"))]
    report.skipped += [(n, "not an image file") for n in ignored if (labels_dir / n).is_file()]
    return found


def find_cases(folder: Path, labels_folder: Path | None = None, labels_as: str = "label"
               ) -> tuple[list[Found], dict[str, int], ImportReport]:
    """What the folder holds: the cases, the labels dataset.json declares ({} without one), and a report with the
    layout and the files that are no case."""
    folder = Path(folder)
    if labels_as not in LABELS_AS:
        raise UserError(f"--labels-as {labels_as}: one of {', '.join(LABELS_AS)}")
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    if (folder / "dataset.json").is_file() or (folder / "imagesTr").is_dir():
        if labels_folder is not None:
            raise UserError(f"{folder} is an nnU-Net dataset: its labels are labelsTr/ (--labels is for a folder of "
                            "images)")
        report = ImportReport("nnU-Net dataset (imagesTr, labelsTr, imagesTs)")
        found, labels = _nnunet(folder, labels_as, report)
        return found, labels, report
    labels_dir = Path(labels_folder) if labels_folder is not None else None
    if labels_dir is not None and not labels_dir.is_dir():
        raise UserError(f"--labels {labels_dir}: no such folder")
    if (folder / "images").is_dir():
        if labels_dir is None and (folder / "labels").is_dir():
            labels_dir = folder / "labels"
        report = ImportReport(f"images/ and {labels_dir if labels_dir is not None else 'no labels'}")
        return _pairs(folder / "images", labels_dir, labels_as, report), {}, report
    report = ImportReport(f"a folder of images{f' with labels in {labels_dir}' if labels_dir is not None else ''}")
    return _pairs(folder, labels_dir, labels_as, report), {}, report


def match_cases(names: list[str], patterns: list[str] | None, where: str) -> list[str]:
    """The names that match any of `patterns` (names or shell patterns; None: all); a pattern that matches
    nothing is refused, naming `where` was looked in."""
    if not patterns:
        return list(names)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UserError(f"--cases {', '.join(unmatched)}: no such case in {where}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _chosen(found: list[Found], patterns: list[str] | None) -> list[Found]:
    chosen = set(match_cases([f.name for f in found], patterns, "the folder"))
    return [f for f in found if f.name in chosen]


def _set_labels(ws: Workspace, labels: dict[str, int], report: ImportReport) -> None:
    """A workspace without labels takes dataset.json's; one with labels must have every value dataset.json has."""
    if not labels:
        return
    with ws.locked() as current:
        if not current.labels:
            current.labels = dict(labels)
            current.save()
            report.notes.append(f"labels from dataset.json: {labels}")
            return
        unknown = {n: v for n, v in labels.items() if v not in current.labels.values()}
        if unknown:
            raise UserError(f"dataset.json's labels {unknown} are not among the workspace's {current.labels}; "
                            "nothing was imported")
        renamed = {n: v for n, v in labels.items() if current.labels.get(n) != v}
        if renamed:
            report.notes.append(f"dataset.json names the labels {renamed}; the workspace keeps its names {current.labels}")


def import_dataset(ws: Workspace, folder: Path, labels_as: str = "label", labels_folder: Path | None = None,
                   cases: list[str] | None = None, allow_uneven: bool = False,
                   on_case: Callable[[str, str, str], None] = lambda name, outcome, detail: None,
                   on_note: Callable[[str], None] = lambda note: None) -> ImportReport:
    """Import the folder's cases (`cases`: names or shell patterns; default all). `on_case(name, "added" or
    "skipped", detail)` is called for each file that is no case, then after each case; `on_note` with what the
    import decided (labels from dataset.json). Bad input of the whole folder (unreadable dataset.json, several
    channels, labels the workspace does not have, unknown --cases) raises before anything is added."""
    found, labels, report = find_cases(folder, labels_folder, labels_as)
    chosen = _chosen(found, cases)
    if not chosen and not report.skipped:
        raise UserError(f"{folder}: no image found ({report.layout})")
    _set_labels(ws, labels, report)
    for note in report.notes:
        on_note(note)
    for name, why in report.skipped:  # files that are no case
        on_case(name, "skipped", why)
    for item in chosen:
        outcome = _import_one(ws, item, allow_uneven)
        (report.added if outcome[0] == "added" else report.skipped).append((item.name, outcome[1]))
        on_case(item.name, *outcome)
    return report


def _import_one(ws: Workspace, item: Found, allow_uneven: bool) -> tuple[str, str]:
    try:
        case_id = check_case_id(item.name)
        paths = {kind: item.label if item.kind == kind else None for kind in LABELS_AS}
        new = prepare_case(ws, item.image, paths["label"], paths["pseudo"], paths["eval"], case_id,
                           review_from=item.table, allow_uneven=allow_uneven)
        if case_id in ws.cases:
            if duplicate_of(ws, new.digest) == case_id:
                return "skipped", "already in the workspace (imported before)"
            return "skipped", "a case of that id with another image is already in the workspace"
        case = commit_case(ws, new)
    except UserError as exc:
        return "skipped", str(exc)
    what = ", ".join(w for w, has in (("ground truth", case.has_label), ("pseudo-label", case.has_pseudo),
                                      ("held-out label", case.has_eval)) if has) or "unlabelled"
    if item.table is not None:
        what += " (review state from its confidence table)"
    return "added", what
