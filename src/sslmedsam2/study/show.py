"""`workspace show WS CASE`: the command-line reviewer's view of a case, as one PNG montage.

The slices still to review, least confident first (the order of the Slicer module's review and of
`ReviewSession.review_order`), each with the label map in colour, its review state as the frame's colour and its
confidence (the lowest over its labels, from the label map's confidence table) in the caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmedsam2.errors import UserError
from sslmedsam2.labelmap.confidence import read_confidence
from sslmedsam2.labelmap.pictures import Box, Panel, draw_panels, grey_slices, label_slices
from sslmedsam2.study.review import HUMAN, SliceState
from sslmedsam2.study.review_session import ReviewSession
from sslmedsam2.study.workspace import Workspace
from sslmedsam2.volume import check_same_grid, read_image, read_label_map

# The frame of a panel says its review state.
STATE_COLOURS: dict[SliceState, tuple[int, int, int]] = {
    SliceState.SEED: (0, 120, 255), SliceState.EDITED: (0, 200, 255), SliceState.ACCEPTED: (0, 200, 0),
    SliceState.REJECTED: (230, 0, 0), SliceState.UNREVIEWED: (110, 110, 110)}
DEFAULT_LIMIT = 12


@dataclass
class ShowReport:
    target: Path
    slices: list[int]  # in the order of the panels
    boxes: list[Box]
    description: str


def parse_slices(text: str, what: str = "--slices") -> list[int]:
    """"3-7,12" -> [3, 4, 5, 6, 7, 12] (in the order given, each once)."""
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        try:
            numbers = range(int(first), int(last) + 1) if dash else [int(first)]
        except ValueError:
            raise UserError(f"{what} {text!r}: slice numbers and ranges separated by commas, e.g. 3-7,12") from None
        if dash and int(last) < int(first):
            raise UserError(f"{what} {text!r}: the range {part} runs backwards; write {last}-{first}")
        chosen += [z for z in numbers if z not in chosen]
    return chosen


def slice_confidence(table: Path | None, n: int) -> list[float]:
    """Per slice, the lowest confidence over its labels (NaN where the table scores nothing, or without a table)."""
    if table is None:
        return [math.nan] * n
    try:
        rows = read_confidence(table)
    except (OSError, UnicodeDecodeError, KeyError, ValueError, TypeError):
        raise UserError(f"{table}: not a confidence table") from None
    return ReviewSession.from_confidence(rows, n).confidence


def _order(candidates: list[int], states: list[SliceState], confidence: list[float]) -> tuple[list[int], str]:
    """Unreviewed candidates least confident first; unscored ones after them, farthest from the slices a person
    vouched for first (interpolation scores nothing), then by position. Every candidate when none is left to
    review."""
    vouched = [z for z, s in enumerate(states) if s in HUMAN]

    def key(z: int) -> tuple:
        unscored = math.isnan(confidence[z])
        distance = min((abs(z - v) for v in vouched), default=0)
        return (unscored, -distance if unscored else confidence[z], z)

    chosen, what = candidates, "slices"
    if states:
        todo = [z for z in candidates if states[z] == SliceState.UNREVIEWED]
        chosen, what = (todo, "unreviewed slices") if todo else (candidates, "slices (every slice is reviewed)")
    scored = any(not math.isnan(confidence[z]) for z in chosen)
    how = ("least confident first" if scored else
           "farthest from the vouched-for slices first (no confidence scores)" if vouched else
           "in slice order (no confidence scores)")
    return sorted(chosen, key=key), f"{what}, {how}"


def show_case(ws: Workspace, case_id: str, target: Path, overlay: Path | None, layer: str,
              table: Path | None = None, slices: list[int] | None = None, limit: int = DEFAULT_LIMIT) -> ShowReport:
    """Draw the case's slices (`slices`, else those to review first, at most `limit`) with `overlay` (a label map on
    the case's grid; None: the image alone) in colour; `table`: the overlay's confidence table."""
    if case_id not in ws.cases:
        raise UserError(f"case {case_id!r} is not in the workspace {ws.root}")
    ws.check_complete([case_id])
    image = read_image(ws.file(case_id, "image"))
    grey, spacing = grey_slices(image, ws.axis, ct=ws.channel.upper() == "CT")
    n = len(grey)
    labels = None
    if overlay is not None:
        label_map = read_label_map(overlay)
        check_same_grid(image, label_map, what=f"{layer} {overlay.name}")
        labels = label_slices(label_map, ws.axis)
    states = ws.review(case_id)
    confidence = slice_confidence(table, n)
    if slices is not None:
        bad = [z for z in slices if not 0 <= z < n]
        if bad:
            raise UserError(f"slices {bad} are outside 0..{n - 1}")
        order, how = list(slices), "the slices asked for"
    else:
        has_label = labels.any(axis=(1, 2)) if labels is not None else np.zeros(n, bool)
        candidates = [z for z in range(n) if has_label[z] or not math.isnan(confidence[z])]
        if not candidates:
            candidates = list(range(n))
        order, how = _order(candidates, states, confidence)
        total = len(order)
        order = order[:limit]
        how = f"{len(order)} of {total} {how}"
    panels = []
    for z in order:
        state = states[z] if states else None
        score = "confidence n/a" if math.isnan(confidence[z]) else f"confidence {confidence[z]:.2f}"
        caption = f"slice {z}" + (f"  {state.value}" if state else "") + f"\n{score}"
        panels.append(Panel(z, grey[z], None if labels is None else labels[z], None, caption,
                            STATE_COLOURS[state] if state else None))
    source = f"{layer} ({overlay.name})" if overlay is not None else "no label map"
    title = (f"case {case_id}, {source}: {how}\nframe: seed/edited blue, accepted green, rejected red, unreviewed "
             f"grey; {ws.axis} slices")
    legend = {v: name for name, v in ws.labels.items()}
    boxes = draw_panels(panels, spacing, Path(target), title, legend, columns=4)
    return ShowReport(Path(target), order, boxes, f"{source}: {how}")

