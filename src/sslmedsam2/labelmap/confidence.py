"""Per-slice, per-label confidence: what the reviewer looks at first, saved beside every output."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from sslmedsam2.atomic import stem, write_text
from sslmedsam2.errors import UserError
from sslmedsam2.provenance import new_result_id, table_header, table_mark

# Pixels whose probability exceeds this count towards a slice's certainty (the mask and its uncertain rim).
CERTAINTY_FLOOR = 0.05


def slice_certainty(prob: np.ndarray) -> np.ndarray:
    """Mean |2p - 1| over the pixels where p > 0.05, per leading index of (k, h, w) probabilities (k objects of one
    slice, or k slices of one label); 1 where no pixel is above 0.05. The one rule for every source (SAM2, few-shot,
    nnU-Net's softmax); torch-free."""
    flat = np.asarray(prob, dtype=np.float32).reshape(len(prob), -1)
    rim = flat > CERTAINTY_FLOOR
    count = rim.sum(1)
    total = np.where(rim, np.abs(2 * flat - 1), 0).sum(1, dtype=np.float32)
    return np.where(count > 0, total / np.maximum(count, 1), 1.0).astype(np.float32)


@dataclass
class SliceConfidence:
    """One slice and one label.

    source: seed (drawn), forward / backward / both (SAM2 passes that covered the slice), interpolated.
    presence: SAM2's object-presence probability (sigmoid of its object score, mean over passes).
    certainty: mean |2p - 1| over the pixels where p > 0.05 (1 = crisp mask, 0 = coin flip).
    agreement: Dice between the forward and backward masks (1 when one pass covered the slice).
    confidence: presence (or its complement when the label is absent) x certainty x agreement; 1 for seeds.
    """

    slice: int
    label: int
    source: str
    present: bool
    voxels: int
    presence: float = math.nan
    certainty: float = math.nan
    agreement: float = math.nan
    confidence: float = math.nan


COLUMNS = [f.name for f in fields(SliceConfidence)]
TABLE_KIND = "confidence table"


def confidence_path(output: Path) -> Path:
    """`case.nii.gz` -> `case.confidence.csv` in the same folder (for a DICOM folder: beside it)."""
    output = Path(output)
    return output.with_name(f"{stem(output)}.confidence.csv")


def _format(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    if isinstance(value, bool):
        return int(value)
    return value


def confidence_text(rows: list[SliceConfidence], result: str | None = None) -> str:
    """The table's text: this tool's mark (with the result it belongs to), the columns, a row per slice and label."""
    buffer = io.StringIO()
    buffer.write(table_header(TABLE_KIND, result))
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r.slice, r.label)):
        writer.writerow({k: _format(v) for k, v in asdict(row).items()})
    return buffer.getvalue()


def write_confidence(rows: list[SliceConfidence], path: Path, result: str | None = None) -> None:
    write_text(path, confidence_text(rows, result))


def parse_confidence(text: str) -> list[SliceConfidence]:
    """A confidence table's text (as a server sends it) -> its rows; `#` lines are comments."""
    rows = []
    lines = (line for line in io.StringIO(text, newline="") if not line.startswith("#"))
    for raw in csv.DictReader(lines):
        rows.append(SliceConfidence(
            slice=int(raw["slice"]), label=int(raw["label"]), source=raw["source"],
            present=raw["present"] == "1", voxels=int(raw["voxels"]),
            **{k: float(raw[k]) if raw[k] else math.nan for k in ("presence", "certainty", "agreement", "confidence")}))
    return rows


def read_confidence(path: Path) -> list[SliceConfidence]:
    with open(path, newline="", encoding="utf-8") as handle:
        return parse_confidence(handle.read())


def write_result(image, output: Path, rows: list[SliceConfidence], compress: bool = True) -> str:
    """A label map and its confidence table as one unit: both carry a new result id, the table is complete before
    the label map appears (atomic, verified), so a kill between the two leaves a pair whose ids differ, which
    `check_pair` refuses. Returns the id."""
    from sslmedsam2.volume.io import staged_image

    result = new_result_id()
    with staged_image(image, output, compress, result):
        write_confidence(rows, confidence_path(output), result)
    return result


def pair_state(output: Path) -> str:
    """'complete' (label map and table of one result), 'missing' (either is absent) or 'mixed' (they come from
    different results: a run was killed between writing them, or one of them was replaced)."""
    from sslmedsam2.volume.io import image_mark

    table = confidence_path(output)
    if not Path(output).exists() or not table.is_file():
        return "missing"
    image, rows = image_mark(output), table_mark(table)
    return "complete" if image.result and image.result == rows.result else "mixed"


def check_pair(output: Path, table: Path | None = None) -> None:
    """Refuse a confidence table that does not belong to the label map `output` (both written by this tool as
    one result, see write_result). A label map without a result id (another tool's file) is not checked."""
    from sslmedsam2.volume.io import image_mark

    table = confidence_path(output) if table is None else Path(table)
    image = image_mark(output)
    if image.result is None:
        return
    rows = table_mark(table)
    if rows.result != image.result:
        raise UserError(f"{table} does not belong to {output}: they come from different runs (one was interrupted "
                        "while writing them, or one was replaced); run the command again to write both")
