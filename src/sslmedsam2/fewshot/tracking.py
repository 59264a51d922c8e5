"""Few-shot videos (query[:k] + support + query[k:]) tracked with SAM2, naively and with reuse.

In every video, the forward pass starts at the support's first prompted slice and the backward pass at its last,
so until a pass leaves the support block it sees only support frames, at the same relative positions whatever
the query and k. SAM2 reads frame positions only as differences, so the block's outputs (its prompts' memories
and its tracked slices) are computed once per support and reused; each video then tracks only its query slices.
The naive path (`track_video_naive`) builds and tracks each video in full, as the reference code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.propagation.predictor import SlicePredictor
from sslmedsam2.propagation.sam2_propagation import autocast_for


class FeatureStore:
    """Image-encoder outputs by frame name, kept on `device` (CPU when the GPU would not hold them)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._fpn: dict[object, list[torch.Tensor]] = {}
        self._pos: list[torch.Tensor] | None = None  # positional encodings are the same for every frame

    def __len__(self) -> int:
        return len(self._fpn)

    def get(self, key: object) -> dict | None:
        fpn = self._fpn.get(key)
        return None if fpn is None else {"backbone_fpn": fpn, "vision_pos_enc": self._pos}

    def put(self, key: object, backbone_out: dict) -> None:
        self._fpn[key] = [f.to(self.device) for f in backbone_out["backbone_fpn"]]
        if self._pos is None:
            self._pos = [p.to(self.device) for p in backbone_out["vision_pos_enc"]]


class VideoFrames(Sequence):
    """query[:k] + support + query[k:] without copying: index -> (source, slice).

    `support` may be None when only the query's frames will be read (the support block is already tracked).
    """

    def __init__(self, query: VolumeFrames, support_length: int, k: int, support: VolumeFrames | None = None) -> None:
        self.query, self.support, self.k, self.support_length = query, support, k, support_length
        self.height, self.width = query.height, query.width

    def __len__(self) -> int:
        return len(self.query) + self.support_length

    def source(self, index: int) -> tuple[str, int]:
        if index < self.k:
            return "query", index
        if index < self.k + self.support_length:
            return "support", index - self.k
        return "query", index - self.support_length

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        which, i = self.source(index)
        if which == "support" and self.support is None:
            raise LookupError("support frames were not supplied to this video")
        return (self.query if which == "query" else self.support)[i]


def support_masks(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Support label slices resized (nearest) to the query's in-plane size, as the reference does."""
    if labels.shape[1:] == (height, width):
        return labels
    resized = F.interpolate(torch.from_numpy(labels.astype(np.int32))[:, None].float(), size=(height, width), mode="nearest")
    return resized[:, 0].numpy().astype(labels.dtype)


def query_rows(n_query: int, n_support: int, k: int) -> np.ndarray:
    """Video frame index of each query slice."""
    rows = np.arange(n_query)
    return np.where(rows < k, rows, rows + n_support)


@dataclass
class VideoResult:
    """Per query slice: low-resolution logits (objects, n_query, S/4, S/4) and object-presence probabilities."""

    logits: torch.Tensor
    presence: torch.Tensor


def track_video_naive(predictor: SlicePredictor, query: VolumeFrames, support: VolumeFrames, masks: np.ndarray,
                      labels: list[int], k: int) -> VideoResult:
    """The reference's ordering: for each pass a fresh state (sam2's init_state encodes frame 0), every prompt
    added again, the whole video tracked from the first prompt forward and from the last one backward, every frame
    encoded again. Each query slice is covered by one of the two passes."""
    video = VideoFrames(query, len(support), k, support)
    n_query = len(query)
    drawn = [[int(z) for z in np.flatnonzero((masks == label).any(axis=(1, 2)))] for label in labels]
    spans = [(k + d[0], k + d[-1]) for d in drawn]
    low = predictor.image_size // 4
    logits, presence = torch.zeros(len(labels), n_query, low, low), torch.zeros(len(labels), n_query)
    passes = (
        (range(min(a for a, _ in spans), len(video)), False, lambda z: [i for i, (a, _) in enumerate(spans) if z >= a]),
        (range(max(b for _, b in spans), -1, -1), True, lambda z: [i for i, (_, b) in enumerate(spans) if z <= b]),
    )
    with torch.inference_mode(), autocast_for(predictor.device):
        for order, reverse, objects in passes:
            state = predictor.init_state_from_frames(video, query.height, query.width)
            predictor._get_image_feature(state, frame_idx=0, batch_size=1)  # sam2's init_state warms up on frame 0
            for label, slices in zip(labels, drawn):
                for z in slices:
                    predictor.add_new_mask(state, k + z, label, masks[z] == label)
            for frame, active, out, scores in predictor.track(state, order, reverse, objects):
                which, row = video.source(frame)
                if which == "query":
                    logits[active, row] = out[:, 0].float().cpu()
                    presence[active, row] = torch.sigmoid(scores[:, 0].float()).cpu()
    return VideoResult(logits, presence)


class SupportMemory:
    """One support's prompt memories and tracked block, computed once, reused by every video it appears in."""

    def __init__(self, predictor: SlicePredictor, support: VolumeFrames, masks: np.ndarray, labels: list[int],
                 video_length: int, height: int, width: int, store: FeatureStore) -> None:
        self.labels = labels
        self.length = len(support)
        state = predictor.init_state_from_frames(support, height, width)
        state["num_frames"] = video_length  # SAM2 bounds its pointer look-back by the video's length
        state["feature_store"], state["frame_keys"] = store, [("support", z) for z in range(len(support))]
        spans = []
        with torch.inference_mode(), autocast_for(predictor.device):
            for label in labels:
                drawn = [int(z) for z in np.flatnonzero((masks == label).any(axis=(1, 2)))]
                spans.append((drawn[0], drawn[-1]))
                for z in drawn:
                    predictor.add_new_mask(state, z, label, masks[z] == label)
            self.forward = self._track_block(predictor, state, range(min(s[0] for s in spans), len(support)), False,
                                             lambda z: [i for i, (a, _) in enumerate(spans) if z >= a])
            self.backward = self._track_block(predictor, state, range(max(s[1] for s in spans), -1, -1), True,
                                              lambda z: [i for i, (_, b) in enumerate(spans) if z <= b])
        self.prompts = [dict(state["output_dict_per_obj"][i]["cond_frame_outputs"]) for i in range(len(labels))]

    @staticmethod
    def _track_block(predictor, state, order, reverse, objects) -> list[dict]:
        predictor.forget_tracking(state)
        for _ in predictor.track(state, order, reverse=reverse, objects=objects):
            pass
        # what is left after tracking's own trimming is exactly what later frames can still read
        return [dict(state["output_dict_per_obj"][i]["non_cond_frame_outputs"]) for i in range(len(state["obj_ids"]))]


def track_video_cached(predictor: SlicePredictor, query: VolumeFrames, query_store: FeatureStore,
                       memory: SupportMemory, k: int) -> VideoResult:
    """The same numbers as `track_video_naive`, tracking only the query slices of the video."""
    n_query, n_support = len(query), memory.length
    video = VideoFrames(query, n_support, k)
    state = predictor.init_state_from_frames(video, query.height, query.width)
    state["feature_store"] = query_store
    state["frame_keys"] = [video.source(i) for i in range(len(video))]
    low = predictor.image_size // 4
    objects = len(memory.labels)
    logits, presence = torch.zeros(objects, n_query, low, low), torch.zeros(objects, n_query)
    with torch.inference_mode(), autocast_for(predictor.device):
        for i, label in enumerate(memory.labels):
            predictor._obj_id_to_idx(state, label)
            state["output_dict_per_obj"][i]["cond_frame_outputs"] = {k + z: out for z, out in memory.prompts[i].items()}
        everyone = list(range(objects))
        for block, order, reverse in ((memory.forward, range(k + n_support, len(video)), False),
                                      (memory.backward, range(k - 1, -1, -1), True)):
            for i in everyone:
                state["output_dict_per_obj"][i]["non_cond_frame_outputs"] = {k + z: out for z, out in block[i].items()}
            for frame, active, masks, scores in predictor.track(state, order, reverse, objects=lambda z: everyone):
                row = video.source(frame)[1]
                logits[active, row] = masks[:, 0].float().cpu()
                presence[active, row] = torch.sigmoid(scores[:, 0].float()).cpu()
    return VideoResult(logits, presence)
