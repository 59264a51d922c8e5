"""Prompt slices as a client sends them (the wire format), decoded and checked; the session's rules
(sslmedsam2.session.prompts) then lay them over its prompts."""

from __future__ import annotations

import numpy as np

from sslmedsam2.errors import UserError
from sslmedsam2.remote.wire import decode_array
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
