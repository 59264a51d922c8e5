"""Local re-propagation after a correction: track outward from each corrected slice, not through the whole volume.

A correction (an edited, accepted-after-edit or newly drawn slice) is a conditioning slice of every label drawn on
it. From it, each such label is tracked forward and backward with the volume's cached features and every seed as a
conditioning memory, each direction from a fresh state, and stops:
  (a) at the label's next conditioning slice (its result there is the drawing), or
  (b) once the new result has agreed with the previous one on `EditRule.slices` consecutive slices (Dice of the
      label's low-resolution masks at least `EditRule.dice`): beyond that SAM2's recent-frame memory no longer
      carries the difference (the default window is the model's own, num_maskmem).
A re-tracked slice's new pass is fused with the previous result's other pass there, as the full propagation fuses
its two passes; slices beyond the stops keep their previous passes exactly. The exact re-propagation (every pass
from scratch) stays what a cold `propagate` computes; this is an approximation, measured by bench/edit_fidelity.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sslmedsam2.jobs import Progress
from sslmedsam2.labelmap.seeds import Seeds
from sslmedsam2.propagation.batched import Track, track_step
from sslmedsam2.propagation.device import autocast_for
from sslmedsam2.propagation.predictor import SlicePredictor
from sslmedsam2.propagation.sam2_propagation import Passes, prepare_state, stepper
from sslmedsam2.settings import EditRule

@dataclass
class Patch:
    """The previous values of what a local re-propagation overwrote in a Passes: restoring it undoes it exactly."""

    rows: list[int] = field(default_factory=list)  # flat rows of (direction, object, slice)
    logits: list[torch.Tensor] = field(default_factory=list)
    presence: list[torch.Tensor] = field(default_factory=list)
    covered: list[tuple[int, int, int, bool]] = field(default_factory=list)  # (object, slice, direction, was)

    def restore(self, passes: Passes) -> None:
        if self.rows:
            low = passes.logits.shape[-1]
            index = torch.tensor(self.rows, device=passes.logits.device)
            passes.logits.view(-1, low, low).index_copy_(0, index, torch.cat(self.logits))
            passes.presence.view(-1).index_copy_(0, index, torch.cat(self.presence))
        for obj, z, direction, was in reversed(self.covered):
            passes.covered[obj, z, direction] = was


@dataclass
class Retracked:
    slices: list[int]  # every slice whose result may differ from before (to re-fuse)
    steps: int  # tracking steps run
    patch: Patch  # undoes the change to the Passes


@dataclass
class _LocalTrack:
    track: Track
    frames: list[int]  # the frames it may reach, in order
    position: int = 0
    agreeing: int = 0

    @property
    def done(self) -> bool:
        return self.position >= len(self.frames)


def _rows(passes: Passes, entries: list[tuple[int, int, bool]]) -> list[int]:
    objects, n = passes.logits.shape[1], passes.logits.shape[2]
    return [(int(reverse) * objects + obj) * n + z for obj, z, reverse in entries]


def _save(passes: Passes, patch: Patch, entries: list[tuple[int, int, bool]]) -> None:
    if not entries:
        return
    low = passes.logits.shape[-1]
    rows = _rows(passes, entries)
    index = torch.tensor(rows, device=passes.logits.device)
    patch.rows += rows
    patch.logits.append(passes.logits.view(-1, low, low).index_select(0, index).clone())
    patch.presence.append(passes.presence.view(-1).index_select(0, index).clone())
    patch.covered += [(obj, z, int(reverse), bool(passes.covered[obj, z, int(reverse)])) for obj, z, reverse in entries]


def _agreement(passes: Passes, previous: torch.Tensor, entries: list[tuple[int, int, bool]]) -> list[float]:
    """Dice, per (object, slice, direction) just tracked, of the label's fused low-resolution mask now and before."""
    objects = torch.tensor([obj for obj, _, _ in entries], device=passes.logits.device)
    slices = torch.tensor([z for _, z, _ in entries], device=passes.logits.device)
    direction = torch.tensor([int(r) for _, _, r in entries], device=passes.logits.device)
    new = passes.logits[direction, objects, slices]
    other = passes.logits[1 - direction, objects, slices]
    both = torch.tensor([bool(passes.covered[obj, z, 1 - int(r)]) for obj, z, r in entries],
                        device=passes.logits.device)
    fused = torch.where(both[:, None, None], (new + other) / 2, new) > 0
    before = previous[objects, slices]
    inter = (fused & before).flatten(1).sum(1)
    total = fused.flatten(1).sum(1) + before.flatten(1).sum(1)
    dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total, dtype=torch.float32))
    return dice.tolist()  # the one wait for the device per step: where to stop depends on it


def retrack(predictor: SlicePredictor, frames, store, seeds: Seeds, passes: Passes, starts: dict[int, list[int]],
            rule: EditRule = EditRule(), progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> Retracked:
    """Re-track outward from each (label: corrected slices) of `starts`, updating `passes` (those of the previous
    result, on the same labels and seeds but the new ones) in place; see the module for the rule."""
    n = len(frames)
    window = rule.window(predictor)
    previous = passes.merged()[0] > 0  # the previous fused masks, to compare with
    plans: list[tuple[int, bool, int, list[int]]] = []  # (object, reverse, start, frames)
    for label, corrected in starts.items():
        obj = passes.labels.index(label)
        conditioning = seeds.slices_of(label)
        for z in sorted(set(corrected)):
            above = [c for c in conditioning if c > z]
            below = [c for c in conditioning if c < z]
            plans.append((obj, False, z, list(range(z + 1, above[0] if above else n))))
            plans.append((obj, True, z, list(range(z - 1, below[-1] if below else -1, -1))))
    if not plans:  # nothing was corrected: the previous result stands
        return Retracked([], 0, Patch())
    planned = max(len(f) for *_, f in plans)  # the most steps it can take
    if progress is not None:
        progress.reset(total=planned)
    step = stepper(progress, should_stop)
    patch = Patch()
    touched = {z for _, _, z, _ in plans}
    with torch.inference_mode(), autocast_for(predictor.device):
        state = prepare_state(predictor, frames, seeds, store)
        tracks = [_LocalTrack(Track(obj, reverse, {
            "cond_frame_outputs": state["output_dict_per_obj"][obj]["cond_frame_outputs"],
            "non_cond_frame_outputs": {}}), frames_) for obj, reverse, _, frames_ in plans]
        seeded = sorted({(obj, z, reverse) for obj, reverse, z, _ in plans})
        outputs = [state["output_dict_per_obj"][obj]["cond_frame_outputs"][z] for obj, z, _ in seeded]
        every = [t.track for t in tracks]
        try:
            _save(passes, patch, seeded)  # the corrected slices' own outputs (their drawings), both directions
            passes.record(seeded, torch.cat([o["pred_masks"] for o in outputs]),
                          torch.cat([o["object_score_logits"] for o in outputs]))
            steps = _run(predictor, state, tracks, every, passes, patch, previous, rule, window, touched, step)
        except BaseException:
            patch.restore(passes)  # a cancelled or failed re-propagation leaves the previous passes
            raise
    if progress is not None and planned > steps:  # stopped early: the bar completes
        progress.update(planned - steps)
    return Retracked(sorted(touched), steps, patch)


def _run(predictor, state, tracks: list[_LocalTrack], every: list[Track], passes: Passes, patch: Patch,
         previous: torch.Tensor, rule: EditRule, window: int, touched: set[int], step) -> int:
    """The batched steps of the local tracks until each has stopped; returns the number of steps."""
    steps = 0
    while True:
        active = [t for t in tracks if not t.done]
        if not active:
            return steps
        batch = [(t.track, t.frames[t.position]) for t in active]
        out = track_step(predictor, state, batch, every)
        entries = [(t.track.obj, frame, t.track.reverse) for t, (_, frame) in zip(active, batch)]
        _save(passes, patch, entries)
        passes.record(entries, out.masks, out.scores)
        for t, (_, frame), output in zip(active, batch, out.outputs):
            t.track.keep(frame, output, predictor.memory_window)
            touched.add(frame)
        for t, dice in zip(active, _agreement(passes, previous, entries)):
            t.agreeing = t.agreeing + 1 if dice >= rule.dice else 0
            t.position = len(t.frames) if t.agreeing >= window else t.position + 1
        steps += 1
        step(1)
