"""`sslmedsam2 evaluate`: two label maps, or two folders of them matched by file name."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk

from sslmedsam2.provenance import table_header
from sslmedsam2.atomic import full_suffix, write_text
from sslmedsam2.errors import UserError
from sslmedsam2.metrics.surface import LabelScores, score_labels
from sslmedsam2.volume import check_same_grid, read_label_map
from sslmedsam2.volume.io import IMAGE_SUFFIXES


@dataclass(frozen=True)
class CaseScores:
    case: str
    scores: list[LabelScores]


def _pairs(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    if pred.is_dir() != truth.is_dir():
        raise UserError("give two files or two folders, not one of each")
    if not pred.is_dir():
        return [(pred.name, pred, truth)]
    def images(folder: Path) -> dict[str, Path]:
        return {p.name: p for p in sorted(folder.iterdir()) if full_suffix(p).lower() in IMAGE_SUFFIXES}

    preds, truths = images(pred), images(truth)
    common = sorted(set(preds) & set(truths))
    if not common:
        raise UserError(f"no file name is in both {pred} and {truth}")
    return [(name, preds[name], truths[name]) for name in common]


def evaluate_paths(pred: Path, truth: Path) -> tuple[list[CaseScores], list[str]]:
    """Scores per case; also the names found on one side only (reported, not scored)."""
    pred, truth = Path(pred), Path(truth)
    for path in (pred, truth):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
    results = []
    for name, p, t in _pairs(pred, truth):
        p_img, t_img = read_label_map(p), read_label_map(t)
        check_same_grid(t_img, p_img, what=f"prediction {name}")
        spacing = tuple(reversed(t_img.GetSpacing()))  # numpy arrays are z, y, x
        scores = score_labels(sitk.GetArrayViewFromImage(p_img), sitk.GetArrayViewFromImage(t_img), spacing)
        results.append(CaseScores(name, scores))
    # a label found in any case gets a row in every case: absent from both maps there, they agree fully
    labels = sorted({s.label for r in results for s in r.scores})
    results = [CaseScores(r.case, sorted(r.scores + [LabelScores(label, 1.0, 0.0, 0.0) for label in labels
                                                     if label not in {s.label for s in r.scores}],
                                         key=lambda s: s.label)) for r in results]
    unmatched = []
    if pred.is_dir():
        names = {r.case for r in results}
        unmatched = sorted({p.name for d in (pred, truth) for p in d.iterdir() if p.is_file()} - names)
    return results, unmatched


def _fmt(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _mean(values: list[float]) -> float:
    """The mean of the values that are numbers (a distance is NaN where a map has no surface); NaN when none is."""
    numbers = [v for v in values if not math.isnan(v)]
    return sum(numbers) / len(numbers) if numbers else math.nan


def label_name(label: int, names: dict[int, str] | None) -> str:
    """`anterior (1)` with a name for the value, else `1`."""
    return f"{names[label]} ({label})" if names and label in names else str(label)


def mean_rows(results: list[CaseScores]) -> list[tuple[str, str | int, float, float, float]]:
    """(what, label, dice, hd95, assd): per label the mean over cases (with more than one case), then the mean over
    every case and label ("all")."""
    by_label: dict[int, list[LabelScores]] = {}
    for case in results:
        for s in case.scores:
            by_label.setdefault(s.label, []).append(s)
    rows: list[tuple[str, str | int, float, float, float]] = []
    if len(results) > 1:
        for label, scores in sorted(by_label.items()):
            rows.append((f"mean of {len(scores)} cases", label, _mean([s.dice for s in scores]),
                         _mean([s.hd95 for s in scores]), _mean([s.assd for s in scores])))
    every = [s for scores in by_label.values() for s in scores]
    if every:
        what = f"mean of {len(results)} case{'s' if len(results) != 1 else ''}" if len(results) > 1 else "mean"
        rows.append((what, "all", _mean([s.dice for s in every]), _mean([s.hd95 for s in every]),
                     _mean([s.assd for s in every])))
    return rows


def scores_table(results: list[CaseScores], names: dict[int, str] | None = None) -> str:
    """The scores as text: a row per case and label (named by `names`: value -> name), then the mean rows."""
    width = max([5] + [len(label_name(s.label, names)) for r in results for s in r.scores])
    lines = [f"{'case':<32} {'label':>{width}} {'dice':>8} {'hd95_mm':>9} {'assd_mm':>9}"]
    for case in results:
        for s in case.scores:
            lines.append(f"{case.case:<32} {label_name(s.label, names):>{width}} {_fmt(s.dice):>8} {_fmt(s.hd95):>9} "
                         f"{_fmt(s.assd):>9}")
    for what, label, d, h, a in mean_rows(results):
        shown = "all labels" if label == "all" else label_name(int(label), names)
        lines.append(f"{what:<32} {shown:>{width}} {_fmt(d):>8} {_fmt(h):>9} {_fmt(a):>9}")
    return "\n".join(lines)


def write_scores_csv(results: list[CaseScores], path: Path, names: dict[int, str] | None = None) -> None:
    """One row per case and label: case, label (the value), dice, hd95, assd; with `names`, a column `name` after
    `label` (empty for a value without one)."""
    buffer = io.StringIO()
    buffer.write(table_header("evaluation scores"))
    writer = csv.writer(buffer, lineterminator="\n")
    named = bool(names)
    writer.writerow(["case", "label", *(["name"] if named else []), "dice", "hd95", "assd"])
    for case in results:
        for s in case.scores:
            writer.writerow([case.case, s.label, *([names.get(s.label, "")] if named else []), _fmt(s.dice),
                             _fmt(s.hd95), _fmt(s.assd)])
    write_text(Path(path), buffer.getvalue())

