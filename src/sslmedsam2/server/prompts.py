"""A session's prompts: the drawn, edited or accepted slices a client sends, each a label map of one slice, and
the seed map they make (what `propagate` reads from a SEEDS file, with the same rules and messages)."""

from __future__ import annotations

import numpy as np

from sslmedsam2.errors import UserError
from sslmedsam2.pipeline import check_seed_map
from sslmedsam2.propagation.seeds import Seeds
from sslmedsam2.server.wire import decode_array
from sslmedsam2.volume.io import MAX_LABEL  # as the command line reads label maps


def decode_slices(entries: list[dict], shape: tuple[int, int, int]) -> dict[int, np.ndarray]:
    """Request entries {index, dtype, data} -> {slice index: (h, w) label plane}, every one checked."""
    n, h, w = shape
    planes: dict[int, np.ndarray] = {}
    for entry in entries:
        index = entry["index"]
        what = f"seed slice {index}"
        if not 0 <= index < n:
            raise UserError(f"{what}: outside 0..{n - 1} (the volume has {n} slices along its axis)")
        if index in planes:
            raise UserError(f"{what}: sent twice")
        plane = decode_array(entry["data"], entry["dtype"], (h, w), what)
        if plane.size and plane.min() < 0:
            raise UserError(f"{what}: label map holds negative values")
        if plane.size and plane.max() > MAX_LABEL:
            raise UserError(f"{what}: label {int(plane.max())} is above {MAX_LABEL}")
        planes[int(index)] = plane
    return planes


def merged(prompts: dict[int, np.ndarray], update: dict[int, np.ndarray], replace: bool) -> dict[int, np.ndarray]:
    """The session's prompts after a request: `update` alone (replace), or laid over them, where an empty plane
    removes that slice's prompts."""
    out = {} if replace else dict(prompts)
    for index, plane in update.items():
        if plane.any():
            out[index] = plane
        else:
            out.pop(index, None)
    return out


def seed_map(prompts: dict[int, np.ndarray], shape: tuple[int, int, int]) -> Seeds:
    """The full seed label map (zeros off the prompt slices), with the checks `pipeline.load_case` makes."""
    top = max((int(p.max()) for p in prompts.values()), default=0)
    labels = np.zeros(shape, np.uint8 if top <= 255 else np.uint16)
    for index, plane in prompts.items():
        labels[index] = plane
    return check_seed_map(labels, "seeds")
