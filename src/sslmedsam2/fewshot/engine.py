"""The model side of the few-shot branch: one predictor, supports' memories kept across queries."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sslmedsam2.errors import UserError
from sslmedsam2.fewshot.fusion import ProbabilityMean, PseudoLabel
from sslmedsam2.fewshot.tracking import (FeatureStore, SupportMemory, support_masks, track_video_cached,
                                         track_video_naive)
from sslmedsam2.fewshot.volumes import FewShotVolume
from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.models import get_model
from sslmedsam2.models.loader import build_predictor, resolve_device
from sslmedsam2.pipeline import PropagateOptions, find_weights

# Share of free GPU memory the query's cached image features may take before they are kept in CPU memory.
_GPU_FEATURE_SHARE = 0.4


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
        self._memories: dict[tuple, SupportMemory] = {}

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
        return self._memories[key]

    def _query_store(self, query: FewShotVolume) -> FeatureStore:
        if self.device.type != "cuda":
            return FeatureStore(self.device)
        s = self.image_size
        per_frame = 4 * (32 * (s // 4) ** 2 + 64 * (s // 8) ** 2 + 256 * (s // 16) ** 2)
        free, _ = torch.cuda.mem_get_info(self.device)
        on_gpu = per_frame * len(query.slices) < _GPU_FEATURE_SHARE * free
        return FeatureStore(self.device if on_gpu else "cpu")

    def pseudo_label(self, query: FewShotVolume, positions: dict[str, list[int]], progress=None) -> PseudoLabel:
        n, height, width = query.slices.shape
        mean = ProbabilityMean(self.labels, n, height, width)
        frames = self._frames(query)
        store = self._query_store(query)
        if progress is not None:
            progress.reset(total=sum(len(p) for p in positions.values()))
        for name, ks in positions.items():
            if self.naive:
                support = self.supports[name]
                support_frames = self._frames(support)
                masks = support_masks(support.labels, height, width)
                results = (track_video_naive(self.predictor, frames, support_frames, masks, self.labels, k) for k in ks)
            else:
                memory = self._memory(name, query)
                results = (track_video_cached(self.predictor, frames, store, memory, k) for k in ks)
            for result in results:
                mean.add(result)
                if progress is not None:
                    progress.update(1)
        return mean.finish()
