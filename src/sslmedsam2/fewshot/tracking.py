"""Few-shot videos (query[:k] + support + query[k:]) tracked with SAM2, naively and with reuse.

In every video, the forward pass starts at the support's first prompted slice and the backward pass at its last,
so until a pass leaves the support block it sees only support frames, at the same relative positions whatever
the query and k. SAM2 reads frame positions only as differences, so the block's outputs (its prompts' memories
and its tracked slices) are computed once per support and reused; each video then tracks only its query slices,
and one support's videos and labels are tracked together, by the tracker propagation uses.
The naive path (`track_video_naive`) builds and tracks each video in full, as the reference code does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.propagation.batched import Track, record_outputs, run_tracks, track_step
from sslmedsam2.propagation.features import FeatureStore, encode_chunk
from sslmedsam2.propagation.predictor import SlicePredictor
from sslmedsam2.propagation.device import autocast_for
from sslmedsam2.propagation.sam2_propagation import tracking_passes
from sslmedsam2.labelmap.seeds import slices_with


class VideoFrames(Sequence):
    """query[:k] + support + query[k:] without copying: index -> (source, slice)."""

    def __init__(self, query: VolumeFrames, support: VolumeFrames, k: int) -> None:
        self.query, self.support, self.k, self.support_length = query, support, k, len(support)
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
        return (self.query if which == "query" else self.support)[i]


def support_masks(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Support label slices resized (nearest) to the query's in-plane size, as the reference does."""
    if labels.shape[1:] == (height, width):
        return labels
    resized = F.interpolate(torch.from_numpy(labels.astype(np.int32))[:, None].float(), size=(height, width), mode="nearest")
    return resized[:, 0].numpy().astype(labels.dtype)


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
    video = VideoFrames(query, support, k)
    n_query = len(query)
    drawn = [slices_with(masks, label) for label in labels]
    low = predictor.image_size // 4
    logits, presence = torch.zeros(len(labels), n_query, low, low), torch.zeros(len(labels), n_query)
    with torch.inference_mode(), autocast_for(predictor.device):
        for order, reverse, objects in tracking_passes([(k + d[0], k + d[-1]) for d in drawn], len(video)):
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
            store.encode(predictor, support, state["frame_keys"], encode_chunk(predictor.device, predictor.image_size))
            for label in labels:
                drawn = slices_with(masks, label)
                spans.append((drawn[0], drawn[-1]))
                for z in drawn:
                    predictor.add_new_mask(state, z, label, masks[z] == label)
            predictor.propagate_in_video_preflight(state)
            # both passes of every label in lockstep, as propagation tracks; what is left after tracking's own
            # trimming is exactly what later frames can still read
            tracks = run_tracks(predictor, state, tracking_passes(spans, len(support)))
        self.forward, self.backward = ([dict(tracks[(i, reverse)].outputs["non_cond_frame_outputs"])
                                        for i in range(len(labels))] for reverse in (False, True))
        self.prompts = [dict(state["output_dict_per_obj"][i]["cond_frame_outputs"]) for i in range(len(labels))]


@dataclass
class QueryVideos:
    """One query's videos with one support: its frames, the name its features are stored under (keys
    (name, slice)), and the insertion points k of its videos."""

    frames: VolumeFrames
    name: object
    ks: Sequence[int]


def track_videos_cached(predictor: SlicePredictor, query: VolumeFrames, query_store: FeatureStore,
                        memory: SupportMemory, ks: Sequence[int], encode_chunk: int = 8,
                        on_step: Callable[[int], None] | None = None) -> list[VideoResult]:
    """The numbers `track_video_naive` gives for each k (one query's videos: `track_queries_cached`)."""
    return track_queries_cached(predictor, [QueryVideos(query, "query", ks)], query_store, memory, encode_chunk,
                                on_step)[0]


def track_queries_cached(predictor: SlicePredictor, queries: Sequence[QueryVideos], store: FeatureStore,
                         memory: SupportMemory, encode_chunk: int = 8,
                         on_step: Callable[[int], None] | None = None) -> list[list[VideoResult]]:
    """The numbers `track_video_naive` gives for every video of every query, tracking only the query slices:
    all videos and labels of this support, across queries, advance together, one batched step (propagation's
    tracker, `batched.track_step`) per query slice. Each (label, video) is a track in its own video's frame
    numbering, starting from the support's prompt memories and tracked block (shared, not copied). The queries
    must share `memory` (same in-plane size, see `FewShotEngine._memory`). `on_step(videos)` after each step."""
    n_support = memory.length
    for query in queries:
        store.encode(predictor, query.frames, [(query.name, z) for z in range(len(query.frames))], encode_chunk)
    low, objects, device = predictor.image_size // 4, len(memory.labels), predictor.device
    videos = [(q, k) for q, query in enumerate(queries) for k in query.ks]
    # every video's outputs in one tensor on the compute device (video v's rows from starts[v], object-major):
    # a step writes its outputs with one operation and waits for no copy
    lengths = [len(queries[q].frames) for q, _ in videos]
    starts = np.cumsum([0] + [objects * n for n in lengths]).tolist()
    logits = torch.zeros(starts[-1], low, low, device=device)
    presence = torch.zeros(starts[-1], device=device)
    first = queries[0].frames
    state = predictor.init_state_from_frames(first, first.height, first.width)
    state["feature_store"] = store
    window = predictor.memory_window
    with torch.inference_mode(), autocast_for(device):
        for block, reverse in ((memory.forward, False), (memory.backward, True)):
            runs = []  # (video, track, query rows in tracking order); a video is query[:k] + support + query[k:]
            for v, (q, k) in enumerate(videos):
                n_query, name = lengths[v], queries[q].name
                rows = range(k - 1, -1, -1) if reverse else range(k, n_query)
                if not rows:
                    continue
                key = (lambda frame, k=k, name=name: (name, frame if frame < k else frame - n_support))
                for i in range(objects):
                    outputs = {"cond_frame_outputs": {k + z: out for z, out in memory.prompts[i].items()},
                               "non_cond_frame_outputs": {k + z: out for z, out in block[i].items()}}
                    runs.append((v, Track(i, reverse, outputs, key, n_query + n_support), rows))
            every = [track for _, track, _ in runs]
            for t in range(max((len(rows) for _, _, rows in runs), default=0)):
                active = [(v, track, rows[t]) for v, track, rows in runs if t < len(rows)]
                frames = [row if reverse else row + n_support for _, _, row in active]
                step = track_step(predictor, state, [(track, frame) for (_, track, _), frame in zip(active, frames)],
                                  every)
                for (_, track, _), frame, out in zip(active, frames, step.outputs):
                    track.keep(frame, out, window)
                record_outputs(logits, presence, [starts[v] + track.obj * lengths[v] + row for v, track, row in active],
                               step.masks, step.scores)
                if on_step is not None:
                    on_step(len({v for v, _, _ in active}))
    logits, presence = logits.cpu(), presence.cpu()
    results: list[list[VideoResult]] = [[] for _ in queries]
    for v, (q, _) in enumerate(videos):
        part = slice(starts[v], starts[v + 1])
        results[q].append(VideoResult(logits[part].view(objects, lengths[v], low, low),
                                      presence[part].view(objects, lengths[v])))
    return results
