"""Per-slice, per-label confidence: what the reviewer looks at first, saved beside every output."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from sslmedsam2.atomic import stem, write_text

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


def write_confidence(rows: list[SliceConfidence], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (r.slice, r.label)):
        writer.writerow({k: _format(v) for k, v in asdict(row).items()})
    write_text(path, buffer.getvalue())


def parse_confidence(text: str) -> list[SliceConfidence]:
    """A confidence table's text (as a server sends it) -> its rows."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text, newline="")):
        rows.append(SliceConfidence(
            slice=int(raw["slice"]), label=int(raw["label"]), source=raw["source"],
            present=raw["present"] == "1", voxels=int(raw["voxels"]),
            **{k: float(raw[k]) if raw[k] else math.nan for k in ("presence", "certainty", "agreement", "confidence")}))
    return rows


def read_confidence(path: Path) -> list[SliceConfidence]:
    with open(path, newline="", encoding="utf-8") as handle:
        return parse_confidence(handle.read())
