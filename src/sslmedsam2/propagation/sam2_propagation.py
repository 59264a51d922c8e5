"""SAM2 propagation of seed masks through a volume: forward and backward passes, fused into one label map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.labelmap import confidence
from sslmedsam2.labelmap.confidence import SliceConfidence
from sslmedsam2.propagation.batched import record_outputs
from sslmedsam2.propagation.predictor import SlicePredictor
from sslmedsam2.jobs import Cancelled, Progress
from sslmedsam2.propagation.device import autocast_for
from sslmedsam2.labelmap.result import Propagation
from sslmedsam2.labelmap.seeds import Seeds


def slice_certainty(prob: torch.Tensor) -> torch.Tensor:
    """`sslmedsam2.labelmap.confidence.slice_certainty` (one rule for every source), computed where `prob` lies:
    per leading index of (k, ...) probabilities."""
    flat = prob.detach().float().flatten(1)
    rim = flat > confidence.CERTAINTY_FLOOR
    count = rim.sum(1)
    total = torch.where(rim, (2 * flat - 1).abs(), 0.0).sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


def _dice(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-object Dice of boolean masks (objects, ...); two empty masks agree fully."""
    a, b = a.flatten(1), b.flatten(1)
    total = a.sum(1) + b.sum(1)
    inter = (a & b).sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total, dtype=torch.float32))


def tracking_passes(spans: list[tuple[int, int]], length: int) -> tuple[tuple[range, bool, Callable], ...]:
    """(frames in order, reverse, objects on a frame) for the forward pass from the earliest first seed and the
    backward pass from the latest last seed; on each frame the objects are those whose seeds the pass has reached.
    `spans` holds each object's (first, last) seeded frame."""
    return ((range(min(a for a, _ in spans), length), False, lambda z: [i for i, (a, _) in enumerate(spans) if z >= a]),
            (range(max(b for _, b in spans), -1, -1), True, lambda z: [i for i, (_, b) in enumerate(spans) if z <= b]))


@dataclass
class Passes:
    """What tracking leaves per label and direction, on the compute device: low-resolution logits
    (2, labels, n, S/4, S/4) (forward, backward), object-presence probabilities (2, labels, n), and which passes
    covered each slice (labels, n, 2: forward, backward) on the host. Objects are `labels` in order."""

    logits: torch.Tensor
    presence: torch.Tensor
    covered: np.ndarray
    labels: list[int]

    @classmethod
    def empty(cls, labels: list[int], n: int, low: int, device: torch.device) -> "Passes":
        return cls(torch.zeros(2, len(labels), n, low, low, device=device), torch.zeros(2, len(labels), n, device=device),
                   np.zeros((len(labels), n, 2), dtype=bool), list(labels))

    def record(self, rows: list[tuple[int, int, bool]], masks: torch.Tensor, scores: torch.Tensor) -> None:
        """A step's outputs, written with one operation each (rows: (object, slice, reverse))."""
        objects, n, low = self.logits.shape[1], self.logits.shape[2], self.logits.shape[-1]
        record_outputs(self.logits.view(-1, low, low), self.presence.view(-1),
                       [(int(reverse) * objects + obj) * n + z for obj, z, reverse in rows], masks, scores)
        for obj, z, reverse in rows:
            self.covered[obj, z, int(reverse)] = True

    def merged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return merge_passes(self.logits, self.presence, torch.from_numpy(self.covered))


def prepare_state(predictor: SlicePredictor, frames: VolumeFrames, seeds: Seeds, store=None,
                  on_chunk: Callable[[int], None] | None = None) -> dict:
    """A tracking state of the volume with every seed as a conditioning frame of its label; with a FeatureStore,
    every slice not in it yet is encoded first, once, and tracking reads the store (batched steps)."""
    state = predictor.init_state_from_frames(frames, frames.height, frames.width)
    if store is not None:
        from sslmedsam2.propagation.features import encode_chunk

        keys = [("slice", z) for z in range(len(frames))]
        store.encode(predictor, frames, keys, encode_chunk(predictor.device, predictor.image_size), on_chunk=on_chunk)
        state["feature_store"], state["frame_keys"] = store, keys
    for label, slices in seeds.seed_slices().items():
        for z in slices:
            predictor.add_new_mask(state, z, label, seeds.labels_map[z] == label)
    if store is not None:
        predictor.propagate_in_video_preflight(state)
    return state


def stepper(progress: Progress | None, should_stop: Callable[[], bool] | None) -> Callable[[int], None]:
    """What a step reports: its count of frames to `progress`, then the stop request as Cancelled."""
    def step(count: int = 1) -> None:
        if progress is not None:
            progress.update(count)
        if should_stop is not None and should_stop():
            raise Cancelled()
    return step


def track_passes(predictor: SlicePredictor, frames: VolumeFrames, seeds: Seeds, progress: Progress | None = None,
                 store=None, should_stop: Callable[[], bool] | None = None) -> Passes:
    """Track each label forward from its first seed and backward from its last, each pass from a fresh state.

    With a FeatureStore (`store`), every slice not in it yet is encoded first, once, and both passes of every label
    advance together, one batched step at a time; without one, sam2 encodes each frame as a pass reaches it.
    `should_stop` is asked after every step; when it answers True the run raises Cancelled.
    """
    n = len(frames)
    spans = [(min(s), max(s)) for s in seeds.seed_slices().values()]
    passes = tracking_passes(spans, n)
    missing = 0 if store is None else sum(store.get(("slice", z)) is None for z in range(n))
    if progress is not None:
        progress.reset(total=missing + sum(len(order) for order, _, _ in passes))
    step = stepper(progress, should_stop)
    # each pass's outputs, kept on the compute device: no step waits for a copy to the host; one copy at the end
    out = Passes.empty(seeds.labels, n, predictor.image_size // 4, predictor.device)
    with torch.inference_mode(), autocast_for(predictor.device):
        state = prepare_state(predictor, frames, seeds, store, on_chunk=step)
        if store is not None:  # every label and both passes advance together, one batched step at a time
            from sslmedsam2.propagation.batched import run_tracks

            run_tracks(predictor, state, passes, on_outputs=out.record, on_step=step)
        else:
            for order, reverse, objects in passes:
                predictor.forget_tracking(state)
                for z, active, masks, scores in predictor.track(state, order, reverse=reverse, objects=objects):
                    out.record([(obj, z, reverse) for obj in active], masks, scores)
                    step()
    return out


def run_passes(predictor: SlicePredictor, frames: VolumeFrames, seeds: Seeds, progress: Progress | None = None,
               store=None, should_stop: Callable[[], bool] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """track_passes, merged: low-resolution logits (objects, n, S/4, S/4) averaged where both passes exist,
    object-presence probabilities (objects, n), forward/backward agreement (objects, n) and which passes covered
    each slice (objects, n, 2). Objects are `seeds.labels` in order."""
    return track_passes(predictor, frames, seeds, progress, store, should_stop).merged()


def merge_passes(per_pass: torch.Tensor, presence: torch.Tensor, covered: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean logits and presence where both passes covered a slice, with their agreement (Dice of the two masks);
    a single pass's own values elsewhere."""
    both = covered.all(-1).to(per_pass.device)
    forward_only = covered[..., 0].to(per_pass.device) & ~both
    logits = torch.where(both[..., None, None], per_pass.mean(0), torch.where(
        forward_only[..., None, None], per_pass[0], per_pass[1]))
    mean_presence = torch.where(both, presence.mean(0), torch.where(forward_only, presence[0], presence[1]))
    agreement = torch.ones_like(mean_presence)
    if both.any():
        agreement[both] = _dice(per_pass[0][both] > 0, per_pass[1][both] > 0)
    return logits, mean_presence, agreement, covered


_TORCH_TYPES = {np.uint8: torch.uint8, np.uint16: torch.int32}  # labels above 255: int32 (few torch kernels take uint16)
# Slices upsampled at once in fusion: (objects x 16) planes of the volume's size.
FUSE_CHUNK = 16


def fuse(logits: torch.Tensor, presence: torch.Tensor, agreement: torch.Tensor, covered: torch.Tensor,
         seeds: Seeds, height: int, width: int, targets: list[int] | None = None) -> Propagation:
    """Upsample, let the highest score win where labels overlap, restore the seeds, score every slice. Runs where
    `logits` lie (the GPU after a GPU propagation): only the label map and the per-slice figures come to the host.
    `targets`: only these slices (the label map is zero elsewhere, and only their rows are made)."""
    labels = seeds.labels
    n = logits.shape[1]
    targets = list(range(n)) if targets is None else sorted(targets)
    lut = torch.tensor([0, *labels], device=logits.device)
    dtype = np.uint8 if max(labels) < 256 else np.uint16
    out = np.zeros((n, height, width), dtype=dtype)
    certainty = torch.ones(len(labels), n, device=logits.device)
    for start in range(0, len(targets), FUSE_CHUNK):
        chunk = targets[start:start + FUSE_CHUNK]
        part = slice(chunk[0], chunk[-1] + 1) if chunk[-1] - chunk[0] + 1 == len(chunk) else chunk
        # bilinear, as SAM2 resizes its low-resolution masks to the video size
        up = F.interpolate(logits[:, part].float(), size=(height, width), mode="bilinear", align_corners=False)
        # made in the map's type on the device: a quarter (uint8) of the int64 bytes cross to the host
        if len(labels) == 1:  # one label: no contest (a CPU spent 1.1 s on it for 512 x 512 x 300)
            winner = (up[0] > 0).to(_TORCH_TYPES[dtype]) * labels[0]
        else:
            best_score, best = up.max(dim=0)
            winner = torch.where(best_score > 0, lut[best + 1], 0).to(_TORCH_TYPES[dtype])
        out[part] = winner.cpu().numpy()
        certainty[:, part] = slice_certainty(torch.sigmoid(up).flatten(0, 1)).view(len(labels), -1)
    certainty, presence, agreement = certainty.cpu(), presence.cpu(), agreement.cpu()
    out = seeds.impose(out)
    seed_slices = seeds.seed_slices()
    rows = []
    for i, label in enumerate(labels):
        drawn = set(seed_slices[label])
        counts = (out == label).sum(axis=(1, 2))
        for z in targets:
            voxels = int(counts[z])
            if z in drawn:
                rows.append(SliceConfidence(z, label, "seed", True, voxels, 1.0, 1.0, 1.0, 1.0))
                continue
            source = {(True, True): "both", (True, False): "forward", (False, True): "backward"}[tuple(covered[i, z].tolist())]
            p, c, a = float(presence[i, z]), float(certainty[i, z]), float(agreement[i, z])
            conf = (p if voxels else 1.0 - p) * c * a
            rows.append(SliceConfidence(z, label, source, voxels > 0, voxels, p, c, a, conf))
    return Propagation(out, rows)
