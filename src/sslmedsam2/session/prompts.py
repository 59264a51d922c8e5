"""Prompts: the drawn, edited or accepted slices, each a label plane of one slice, and the seed map they make.
One set of rules for a SEEDS file, a server's requests and the Slicer module's slices."""

from __future__ import annotations

import numpy as np

from sslmedsam2.errors import UserError
from sslmedsam2.labelmap.seeds import Seeds

# More distinct values than this in a seed map means it is not a drawing (IMAGE and SEEDS swapped?).
MAX_SEED_LABELS = 50


def check_seed_map(seeds: np.ndarray, what: str) -> Seeds:
    """A drawing: a few labels, at least one voxel. Returns the map as Seeds, searched once (a search of
    512 x 512 x 300 voxels takes about 30 ms)."""
    checked = Seeds(seeds, allow_empty=True)
    distinct = len(checked.labels)
    if distinct > MAX_SEED_LABELS:
        raise UserError(f"{what}: holds {distinct} distinct labels, more than the {MAX_SEED_LABELS} structures "
                        "propagated at once (0 = background). Are IMAGE and SEEDS swapped?")
    if not distinct:
        raise UserError(f"{what}: the seed label map has no labelled voxel; draw the structure on at least one slice")
    return checked


def planes_of(seeds: np.ndarray) -> dict[int, np.ndarray]:
    """The labelled slices of a slice-first seed map, as prompt planes."""
    return {int(z): seeds[z] for z in np.flatnonzero(seeds.reshape(len(seeds), -1).any(axis=1))}


def merged(prompts: dict[int, np.ndarray], update: dict[int, np.ndarray], replace: bool) -> dict[int, np.ndarray]:
    """The prompts after a request: `update` alone (replace), or laid over them, where an empty plane removes that
    slice's prompts."""
    out = {} if replace else dict(prompts)
    for index, plane in update.items():
        if plane.any():
            out[int(index)] = plane
        else:
            out.pop(int(index), None)
    return out


def seed_map(prompts: dict[int, np.ndarray], shape: tuple[int, int, int], what: str = "seeds") -> Seeds:
    """The full seed label map (zeros off the prompt slices), checked as a SEEDS file is."""
    n, h, w = shape
    for index, plane in prompts.items():
        if not 0 <= index < n:
            raise UserError(f"seed slice {index}: outside 0..{n - 1} (the volume has {n} slices along its axis)")
        if plane.shape != (h, w):
            raise UserError(f"seed slice {index}: a plane of {plane.shape}, the volume's slices are {(h, w)}")
    top = max((int(p.max()) for p in prompts.values()), default=0)
    labels = np.zeros(shape, np.uint8 if top <= 255 else np.uint16)
    for index, plane in prompts.items():
        labels[index] = plane
    return check_seed_map(labels, what)
