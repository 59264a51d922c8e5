"""A few-shot run's review order (ranking.csv): cases from least to most trustworthy, each with its slices in the
same order. Reading it needs no torch: the Slicer module does, on the thin client."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from sslmedsam2.atomic import stem, write_text
from sslmedsam2.labelmap.confidence import read_confidence
from sslmedsam2.provenance import table_header

RANKING = "ranking.csv"
RANKING_KIND = "review ranking"


def write_ranking(outdir: Path) -> Path:
    """Cases from least to most trustworthy, each followed by its slices in the same order: what to review first."""
    cases = []
    for case_file in sorted(outdir.glob("*.case.json")):
        info = json.loads(case_file.read_bytes())
        if (outdir / info["query_file"]).exists():
            cases.append(info)
    cases.sort(key=lambda c: (c["case_confidence"], c["query_file"]))
    buffer = io.StringIO()
    buffer.write(table_header(RANKING_KIND))
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case_rank", "case", "case_confidence", "slice", "label", "slice_confidence"])
    for rank, info in enumerate(cases, start=1):
        rows = [r for r in read_confidence(outdir / f"{stem(Path(info['query_file']))}.confidence.csv") if r.present]
        if not rows:
            writer.writerow([rank, info["query_file"], f"{info['case_confidence']:.4f}", "", "", ""])
        for r in sorted(rows, key=lambda r: (r.confidence, r.slice, r.label)):
            writer.writerow([rank, info["query_file"], f"{info['case_confidence']:.4f}", r.slice, r.label, f"{r.confidence:.4f}"])
    path = outdir / RANKING
    write_text(path, buffer.getvalue())
    return path


def least_trustworthy_case(outdir: Path) -> str | None:
    """The query file that ranking.csv puts first for review; None before any case is finished."""
    path = Path(outdir) / RANKING
    if not path.is_file():
        return None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    rows = list(csv.DictReader(lines))
    return rows[0]["case"] if rows else None
