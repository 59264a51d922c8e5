"""Per-slice review state of a pseudo-label: where it came from and what a person said about it."""

from __future__ import annotations

from enum import Enum

import numpy as np


class SliceState(str, Enum):
    SEED = "seed"  # drawn by a person
    ACCEPTED = "accepted"  # looked at and kept
    REJECTED = "rejected"  # looked at and judged wrong
    EDITED = "edited"  # corrected by a person (a new seed)
    UNREVIEWED = "unreviewed"  # nobody looked yet


HUMAN = frozenset({SliceState.SEED, SliceState.ACCEPTED, SliceState.EDITED})  # a person vouches for these slices

# What `--ignore` exports as nnU-Net's ignore label.
IGNORE_POLICIES = {
    "none": frozenset(),
    "rejected": frozenset({SliceState.REJECTED}),
    "unreviewed": frozenset({SliceState.REJECTED, SliceState.UNREVIEWED}),
}


def states_from_confidence(rows, n: int) -> list[SliceState]:
    """Initial states from a confidence table (`propagate`'s or `pseudolabel`'s): drawn slices are seeds."""
    states = [SliceState.UNREVIEWED] * n
    for row in rows:
        if row.source == "seed" and 0 <= row.slice < n:
            states[row.slice] = SliceState.SEED
    return states


def human_slices(states: list[SliceState]) -> np.ndarray:
    return np.array([s in HUMAN for s in states], dtype=bool)
