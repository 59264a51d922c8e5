"""Label values between the study and the scene, and the prompts of "Refine with SAM2 from the best slices".

No Slicer here (numpy, and SimpleITK for reading the engine's seed file). Arrays are Slicer's (k, j, i) order, which
is also SimpleITK's array order of the files the module exports, so `axis` is the numpy axis the engine slices along.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def label_slots(labels: dict[str, int], segment_of: dict[str, str]) -> list[str]:
    """ImportLabelmapToSegmentationNode gives label value i + 1 to the i-th segment id of its list and skips empty
    ids: so a workspace's values (liver 1, kidney 3) land in their named segments, with "" where no label has a
    value."""
    if not labels or min(labels.values()) < 1:
        raise ValueError(f"the workspace's label values must be positive: {labels}")
    slots = [""] * max(labels.values())
    for name, value in labels.items():
        slots[value - 1] = segment_of[name]
    return slots


def label_map(masks: list[np.ndarray]) -> np.ndarray:
    """Segments (in order) as one label map, segment i as value i + 1 (a later segment wins where two overlap, as
    ExportSegmentsToLabelmapNode does)."""
    if not masks:
        raise ValueError("no segment")
    out = np.zeros(masks[0].shape, np.uint8 if len(masks) < 256 else np.uint16)
    for index, mask in enumerate(masks):
        out[np.asarray(mask) > 0] = index + 1
    return out


def slices_with_labels(labels: np.ndarray, axis: int) -> list[int]:
    """Slice indices along `axis` that carry any label."""
    return [int(z) for z in np.flatnonzero(np.moveaxis(labels, axis, 0).any(axis=(1, 2)))]


def read_label_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A label file the engine wrote on the exported volume's grid, as a (k, j, i) array; its shape is checked."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    if array.shape != tuple(shape):
        raise ValueError(f"{Path(path).name} has {array.shape} voxels, the volume {tuple(shape)}")
    return array


def key_slice_prompts(key_seeds: np.ndarray, segment_value: dict[int, int], human: np.ndarray,
                      human_slices: list[int], rejected: list[int], axis: int) -> tuple[np.ndarray, list[int], list[int]]:
    """The seeds of a propagation from nnU-Net's key slices and the reviewer's slices.

    key_seeds: `sslmedsam2 keyslices`' seed map (workspace label values); segment_value maps a workspace value to the
    segment's value in `human` (the current segmentation as a label map), values without a segment are dropped.
    A key slice on a slice the reviewer rejected is not used (the reviewer said nnU-Net is wrong there); on the
    reviewer's own slices (seed, edited, accepted) their content wins. Returns (seeds in `human`'s values, the
    prompt slices, the key slices used).
    """
    if key_seeds.shape != human.shape:
        raise ValueError(f"key slices on {key_seeds.shape} voxels, the segmentation on {human.shape}")
    keys = np.moveaxis(key_seeds, axis, 0)
    reviewer = np.moveaxis(human, axis, 0)
    seeds = np.zeros_like(human)
    out = np.moveaxis(seeds, axis, 0)  # a view: writing slices of it writes `seeds`
    vouched, refused = set(human_slices), set(rejected)
    used = []
    for z in np.flatnonzero(keys.any(axis=(1, 2))):
        if z in vouched or z in refused:
            continue
        for value, segment in segment_value.items():
            out[z][keys[z] == value] = segment
        if out[z].any():
            used.append(int(z))
    for z in vouched:
        out[z] = reviewer[z]
    prompts = sorted(set(used) | {z for z in vouched if out[z].any()})
    return seeds, prompts, used
