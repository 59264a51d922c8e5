"""Key slices of a coarse prediction: per label, the slices most worth prompting SAM2 with (torch-free).

A slice of label L is a candidate when L's mask on it continues into both neighbouring slices of L's largest 3D
component: its continuity (the smaller Dice of the slice's mask with the component on the slice before and after)
must reach `min_continuity` (after the SSS paper's prompt-slice selection). The extent of the component is split
into K equal parts and the best candidate of each part is kept (spread over the structure): the most certain one
when per-slice certainty is known (nnU-Net's softmax, `slice_certainty`), else the most continuous; ties go to the
slice nearest the part's middle. A part without a candidate gives no key slice, so a label can get fewer than K
(or none: it is then reported, not guessed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from sslmedsam2.errors import UserError
from sslmedsam2.labelmap.confidence import slice_certainty

DEFAULT_PER_LABEL = 3
DEFAULT_MIN_CONTINUITY = 0.6


@dataclass(frozen=True)
class KeySlice:
    label: int
    slice: int
    continuity: float
    certainty: float  # nan when no certainty was given
    part: tuple[int, int]  # first and last slice of the part of the label's extent it was chosen from


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected 3D component of a boolean volume (empty stays empty)."""
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return components > 0
    sizes = np.bincount(components.ravel())[1:]
    return components == int(np.argmax(sizes)) + 1


def _dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per slice of (n, h, w) boolean stacks; two empty slices give 0 (nothing continues)."""
    inter = (a & b).sum(axis=(1, 2))
    total = a.sum(axis=(1, 2)) + b.sum(axis=(1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 0.0)


def continuity(mask: np.ndarray, component: np.ndarray) -> np.ndarray:
    """Per slice: the smaller Dice of the slice's mask with the component on the slice before and on the slice after
    (a neighbour outside the volume does not count); 0 where the component is not on the slice."""
    n = len(mask)
    before = np.full(n, np.inf)
    after = np.full(n, np.inf)
    if n > 1:
        before[1:] = _dice(mask[1:], component[:-1])
        after[:-1] = _dice(mask[:-1], component[1:])
    score = np.minimum(before, after)
    score[~component.any(axis=(1, 2))] = 0.0
    return np.where(np.isinf(score), 1.0, score)  # a single-slice volume: nothing to continue into


def select_key_slices(labels: np.ndarray, per_label: int = DEFAULT_PER_LABEL,
                      min_continuity: float = DEFAULT_MIN_CONTINUITY,
                      certainty: dict[int, np.ndarray] | None = None,
                      label_values: list[int] | None = None) -> list[KeySlice]:
    """Key slices of a slice-first label map (n, h, w).

    certainty: per label, one value per slice (higher = more trustworthy), e.g. from `certainty_from_probabilities`
    or a confidence table; labels without it are ranked by continuity. label_values: the labels to choose for
    (default: every label in the map).
    """
    check_parameters(per_label, min_continuity)
    certainty = certainty or {}
    values = label_values if label_values is not None else [int(v) for v in np.unique(labels) if v != 0]
    chosen = []
    for label in values:
        mask = labels == label
        component = largest_component(mask)
        present = np.flatnonzero(component.any(axis=(1, 2)))
        if not len(present):
            continue
        cont = continuity(mask, component)
        known = certainty.get(label)
        if known is not None and len(known) != len(labels):
            raise UserError(f"label {label}: {len(known)} certainty values for {len(labels)} slices")
        for part in np.array_split(np.arange(present[0], present[-1] + 1), per_label):
            candidates = [int(z) for z in part if cont[z] >= min_continuity and component[z].any()]
            if not candidates:
                continue
            centre = (part[0] + part[-1]) / 2  # last tie-break: the middle of the part (even spread)
            if known is not None:
                best = max(candidates, key=lambda z: (_finite(known[z]), cont[z], -abs(z - centre)))
            else:
                best = max(candidates, key=lambda z: (cont[z], -abs(z - centre)))
            chosen.append(KeySlice(label, best, float(cont[best]),
                                   float(known[best]) if known is not None else math.nan,
                                   (int(part[0]), int(part[-1]))))
    return chosen


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else -math.inf


def check_parameters(per_label: int, min_continuity: float, per_label_option: str = "--per-label") -> None:
    if per_label < 1:
        raise UserError(f"{per_label_option} {per_label}: at least 1 key slice per label")
    if not 0 <= min_continuity <= 1:
        raise UserError(f"--min-continuity {min_continuity}: a Dice between 0 and 1")


def seed_map(labels: np.ndarray, keys: list[KeySlice]) -> np.ndarray:
    """The seeds of the chosen key slices: on each, the label's largest 3D component (stray pieces left out)."""
    seeds = np.zeros_like(labels)
    components = {}
    for key in keys:
        if key.label not in components:
            components[key.label] = largest_component(labels == key.label)
        seeds[key.slice][components[key.label][key.slice]] = key.label
    return seeds


def certainty_from_probabilities(probabilities: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per label, per slice of a slice-first probability map (n, h, w): `slice_certainty`."""
    return {label: slice_certainty(prob) for label, prob in probabilities.items()}


def certainty_from_table(rows) -> dict[int, np.ndarray]:
    """Per label, per slice: the certainty column of a confidence table (`propagate`, `pseudolabel`, `predict`)."""
    n = max((r.slice for r in rows), default=-1) + 1
    out: dict[int, np.ndarray] = {}
    for row in rows:
        out.setdefault(row.label, np.full(n, math.nan))[row.slice] = row.certainty
    return out


_PROB_NAME = re.compile(r"\.prob_(\d+)\.")


def parse_prob_argument(text: str) -> tuple[int | None, Path]:
    """`LABEL=PATH`, a pseudolabel output `NAME.prob_<label>.nii.gz`, or a `.confidence.csv` (label None)."""
    label, sep, rest = text.partition("=")
    if sep and label.strip().isdigit():
        return int(label), Path(rest)
    path = Path(text)
    if path.name.endswith(".csv"):
        return None, path
    match = _PROB_NAME.search(path.name)
    if match is None:
        raise UserError(f"--prob {text}: name the label (LABEL=PATH), give a NAME.prob_<label> file from "
                        "`pseudolabel`, or a .confidence.csv")
    return int(match.group(1)), path


def run_keyslices(prediction: Path, output: Path, probs: list[str] = (), per_label: int | None = None,
                  min_continuity: float | None = None, axis: str = "axial", log=print,
                  overwrite: bool = False) -> list[KeySlice]:
    """`sslmedsam2 keyslices`: read a prediction (and its probabilities or confidence table), write the key slices
    as a seed map on the prediction's grid. Everything is checked before anything is written."""
    import SimpleITK as sitk

    from sslmedsam2.labelmap.confidence import check_pair, read_confidence
    from sslmedsam2.volume import check_same_grid, read_image, read_label_map, slice_axis, write_image
    from sslmedsam2.volume.io import check_geometry_fits, check_output

    per_label = DEFAULT_PER_LABEL if per_label is None else per_label
    min_continuity = DEFAULT_MIN_CONTINUITY if min_continuity is None else min_continuity
    check_parameters(per_label, min_continuity)
    sources = [parse_prob_argument(text) for text in probs]
    prediction, output = Path(prediction), Path(output)
    check_output(output, (prediction, *(path for _, path in sources)), overwrite)
    image = read_label_map(prediction)
    check_geometry_fits(image, output, what=str(prediction))
    array_axis = slice_axis(image, axis)
    labels = np.moveaxis(sitk.GetArrayFromImage(image), array_axis, 0)
    values = [int(v) for v in np.unique(labels) if v != 0]
    if not values:
        raise UserError(f"{prediction}: the label map has no labelled voxel; there is nothing to choose from")
    certainty: dict[int, np.ndarray] = {}
    for label, path in sources:
        if not path.is_file():
            raise UserError(f"--prob {path}: no such file")
        if label is None:
            check_pair(prediction, path)
            try:
                rows = read_confidence(path)
            except (KeyError, ValueError):
                raise UserError(f"--prob {path}: not a confidence table (.confidence.csv of propagate, pseudolabel "
                                "or predict)") from None
            if max((r.slice for r in rows), default=-1) + 1 != len(labels):
                raise UserError(f"--prob {path}: the table covers {max((r.slice for r in rows), default=-1) + 1} "
                                f"slices, {prediction} has {len(labels)} {axis} slices (another image or --axis?)")
            certainty.update({k: v for k, v in certainty_from_table(rows).items() if k not in certainty})
            continue
        prob = read_image(path)
        check_same_grid(image, prob, what=f"probability map {path.name}")
        array = np.moveaxis(sitk.GetArrayFromImage(prob), array_axis, 0)
        if array.min() < 0 or array.max() > 1:
            raise UserError(f"--prob {path}: values {array.min():.3g}..{array.max():.3g} are not probabilities (0..1)")
        if label not in values:
            log(f"--prob {path}: label {label} is not in {prediction.name}; not used")
            continue
        certainty.update(certainty_from_probabilities({label: array}))
    keys = select_key_slices(labels, per_label, min_continuity, certainty, values)
    for label in values:
        if not any(k.label == label for k in keys):
            log(f"label {label}: no slice continues into both neighbours with Dice >= {min_continuity}; no key slice")
    seeds = seed_map(labels, keys)
    if not seeds.any():
        raise UserError(f"{prediction}: no slice of any label reaches --min-continuity {min_continuity}; lower it")
    out = sitk.GetImageFromArray(np.moveaxis(seeds, 0, array_axis))
    out.CopyInformation(image)
    write_image(out, output)
    return keys
