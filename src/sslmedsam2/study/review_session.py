"""Reviewing a propagated segmentation slice by slice: the state machine the Slicer module drives, with undo.

Slices a person vouches for (seed, accepted, edited) are the prompts of a re-propagation and come back unchanged;
re-propagation turns rejected slices back to unreviewed, since their content is new.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sslmedsam2.study.review import HUMAN, SliceState


@dataclass
class _Step:
    before: dict[int, SliceState]
    after: dict[int, SliceState]
    payload: object = None  # what else the caller must restore on undo (e.g. the segmentation before a run)


@dataclass
class ReviewSession:
    states: list[SliceState]
    confidence: list[float]  # per slice; NaN where nothing scored it
    _undo: list[_Step] = field(default_factory=list)
    _redo: list[_Step] = field(default_factory=list)

    @classmethod
    def from_confidence(cls, rows, n: int) -> "ReviewSession":
        """From a confidence table: drawn slices are seeds; a slice's confidence is its least confident label's."""
        states = [SliceState.UNREVIEWED] * n
        confidence = [math.nan] * n
        for row in rows:
            if not 0 <= row.slice < n:
                continue
            if row.source == "seed":
                states[row.slice] = SliceState.SEED
            if not math.isnan(row.confidence):
                current = confidence[row.slice]
                confidence[row.slice] = row.confidence if math.isnan(current) else min(current, row.confidence)
        return cls(states, confidence)

    # --- changing states ---------------------------------------------------------------------------------------
    def _apply(self, change: dict[int, SliceState], payload: object = None) -> bool:
        change = {z: s for z, s in change.items() if self.states[z] != s}
        if not change and payload is None:
            return False
        step = _Step({z: self.states[z] for z in change}, change, payload)
        for z, state in change.items():
            self.states[z] = state
        self._undo.append(step)
        self._redo.clear()
        return True

    def _check(self, z: int) -> None:
        if not 0 <= z < len(self.states):
            raise IndexError(f"slice {z} is outside 0..{len(self.states) - 1}")

    def accept(self, z: int) -> bool:
        """A seed or an edited slice is already a person's; accepting it changes nothing."""
        self._check(z)
        return self.states[z] in (SliceState.UNREVIEWED, SliceState.REJECTED) and self._apply({z: SliceState.ACCEPTED})

    def reject(self, z: int) -> bool:
        self._check(z)
        return self.states[z] in (SliceState.UNREVIEWED, SliceState.ACCEPTED) and self._apply({z: SliceState.REJECTED})

    def edited(self, z: int) -> bool:
        """A person changed the slice: it becomes a prompt. A drawn seed stays a seed."""
        self._check(z)
        return self.states[z] != SliceState.SEED and self._apply({z: SliceState.EDITED})

    def checkpoint(self, payload: object) -> None:
        """An undoable step that changes no state, e.g. the segmentation before a first propagation."""
        self._apply({}, payload)

    def repropagated(self, payload: object = None) -> None:
        """After a re-propagation from `prompt_slices()`: rejected slices hold new content to review."""
        self._apply({z: SliceState.UNREVIEWED for z, s in enumerate(self.states) if s == SliceState.REJECTED}, payload)

    def undo(self) -> object:
        """Undo the last change; returns its payload (None for a plain state change), or raises when none is left."""
        if not self._undo:
            raise LookupError("nothing to undo")
        step = self._undo.pop()
        for z, state in step.before.items():
            self.states[z] = state
        self._redo.append(step)
        return step.payload

    def redo(self) -> object:
        if not self._redo:
            raise LookupError("nothing to redo")
        step = self._redo.pop()
        for z, state in step.after.items():
            self.states[z] = state
        self._undo.append(step)
        return step.payload

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    # --- navigation ----------------------------------------------------------------------------------------------
    def review_order(self) -> list[int]:
        """Unreviewed slices, least confident first (unscored ones last), then by position."""
        unreviewed = [z for z, s in enumerate(self.states) if s == SliceState.UNREVIEWED]
        return sorted(unreviewed, key=lambda z: (math.isnan(self.confidence[z]),
                                                 0.0 if math.isnan(self.confidence[z]) else self.confidence[z], z))

    def next_unreviewed(self, after: int, step: int = 1) -> int | None:
        """The next unreviewed slice after `after` in direction `step` (+1 or -1), wrapping around."""
        n = len(self.states)
        for k in range(1, n + 1):
            z = (after + step * k) % n
            if self.states[z] == SliceState.UNREVIEWED:
                return z
        return None

    def prompt_slices(self) -> list[int]:
        """Slices a re-propagation starts from: seeds, edited and accepted slices."""
        return [z for z, s in enumerate(self.states) if s in HUMAN]

    def counts(self) -> dict[str, int]:
        return {state.value: sum(s == state for s in self.states) for state in SliceState}
