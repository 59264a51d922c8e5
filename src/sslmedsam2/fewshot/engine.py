"""The model side of the few-shot branch: one predictor, supports' memories kept across queries."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from sslmedsam2.errors import UserError
from sslmedsam2.fewshot.fusion import ProbabilityMean, PseudoLabel
from sslmedsam2.fewshot.tracking import (SupportMemory, VideoResult, support_masks, track_video_naive,
                                         track_videos_cached)
from sslmedsam2.fewshot.volumes import FewShotVolume
from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.propagation.features import FeatureStore, encode_chunk, feature_device
from sslmedsam2.models import get_model
from sslmedsam2.models.loader import build_predictor, resolve_device
from sslmedsam2.pipeline import PropagateOptions, find_weights

class FewShotEngine:
    def __init__(self, options, supports: list[FewShotVolume], labels: list[int], log: Callable[[str], None],
                 download_progress=False) -> None:
        weights = find_weights(PropagateOptions(method="sam2", model=options.model, checkpoint=options.checkpoint,
                                                download=options.download), log, download_progress)
        if weights is None:  # pragma: no cover - find_weights raises for method sam2
            raise UserError("the few-shot branch needs SAM2 weights")
        self.device = resolve_device(options.device)
        self.predictor = build_predictor(get_model(options.model), weights, self.device, options.image_size)
        self.image_size = self.predictor.image_size
        self.supports = {s.name: s for s in supports}
        self.labels = labels
        self.naive = options.naive
        self.log = log
        # one per support and query grid; queries of other grids evict the least recently used
        self._memories: OrderedDict[tuple, SupportMemory] = OrderedDict()
        self._video_batch: int | None = None  # set when the GPU ran out of memory on a larger batch
        self._encode_chunk = encode_chunk(self.device, self.image_size)

    def _frames(self, volume: FewShotVolume) -> VolumeFrames:
        return VolumeFrames(volume.slices, self.image_size, self.device)

    def _memory(self, name: str, query: FewShotVolume) -> SupportMemory:
        support = self.supports[name]
        n_query, height, width = query.slices.shape
        video_length = n_query + len(support.slices)
        # SAM2 reads the video's length only to bound pointer look-back: beyond that bound all lengths agree
        key = (name, height, width, min(video_length, self.predictor.max_obj_ptrs_in_encoder))
        if key not in self._memories:
            masks = support_masks(support.labels, height, width)
            self._memories[key] = SupportMemory(self.predictor, self._frames(support), masks, self.labels,
                                                video_length, height, width, FeatureStore(self.device))
            while len(self._memories) > 2 * len(self.supports):
                self._memories.popitem(last=False)
        self._memories.move_to_end(key)
        return self._memories[key]

    def _query_store(self, query: FewShotVolume) -> FeatureStore:
        """Every video reads each query slice: its features stay in memory (CPU memory at worst)."""
        return FeatureStore(feature_device(self.device, self.image_size, len(query.slices)) or "cpu")

    def _track(self, frames: VolumeFrames, store: FeatureStore, memory: SupportMemory, ks: list[int],
               progress=None) -> list[VideoResult]:
        """One support's videos as one batch; smaller batches, then query features in CPU memory, when the GPU
        runs out of memory."""
        size = self._video_batch or len(ks)
        reported = 0

        def step(slices: int) -> None:
            nonlocal reported
            reported += slices
            if progress is not None:
                progress.update(slices)

        try:
            return [video for start in range(0, len(ks), size)
                    for video in track_videos_cached(self.predictor, frames, store, memory, ks[start:start + size],
                                                     self._encode_chunk, on_step=step)]
        except torch.OutOfMemoryError:
            if progress is not None:
                progress.update(-reported)  # this support's videos start again
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if size > 1:
                self._video_batch = size // 2
                self.log(f"out of GPU memory: now at most {self._video_batch} video(s) per batch")
            elif store.device.type != "cpu":
                store.move_to("cpu")
                self.log("out of GPU memory: keeping the query's image features in CPU memory")
            else:
                raise UserError("out of GPU memory even for one video: lower --image-size or use --device cpu") \
                    from None
            return self._track(frames, store, memory, ks, progress)

    def pseudo_label(self, query: FewShotVolume, positions: dict[str, list[int]], progress=None) -> PseudoLabel:
        """`progress` counts query slices tracked, summed over videos."""
        n, height, width = query.slices.shape
        mean = ProbabilityMean(self.labels, n, height, width)
        frames = self._frames(query)
        store = self._query_store(query)
        if progress is not None:
            progress.reset(total=n * sum(len(p) for p in positions.values()))
        for name, ks in positions.items():
            if self.naive:
                support = self.supports[name]
                support_frames = self._frames(support)
                masks = support_masks(support.labels, height, width)
                for k in ks:
                    mean.add(track_video_naive(self.predictor, frames, support_frames, masks, self.labels, k))
                    if progress is not None:
                        progress.update(n)
            else:
                for result in self._track(frames, store, self._memory(name, query), ks, progress):
                    mean.add(result)
        return mean.finish()
