"""The model side of the few-shot branch: one predictor, supports' memories kept across queries."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from sslmedsam2.errors import UserError
from sslmedsam2.fewshot.fusion import ProbabilityMean, PseudoLabel
from sslmedsam2.fewshot.tracking import (QueryVideos, SupportMemory, VideoResult, support_masks,
                                         track_queries_cached, track_video_naive)
from sslmedsam2.volume.slices import SliceVolume
from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.propagation.features import (GPU_FEATURE_SHARE, FeatureStore, encode_chunk, feature_device,
                                             frame_feature_bytes)
from sslmedsam2.propagation.builder import build_predictor
from sslmedsam2.propagation.device import resolve_device
from sslmedsam2.models.cache import find_weights
from sslmedsam2.labelmap.seeds import drawn_slices

# Working memory of a tracking step per memory-bank token of one track, besides 4 bytes per query token for the
# padding mask, should the attention kernel expand it into a bias: the bank and its position encoding in float32
# (512 B), the cross-attention's keys and values and their rotary copies (about 2 KB). An upper estimate, not
# measured on a GPU; running out of memory falls back to smaller batches.
BANK_TOKEN_BYTES = 2560


class FewShotEngine:
    def __init__(self, options, supports: list[SliceVolume], labels: list[int], log: Callable[[str], None],
                 download_progress=False) -> None:
        engine = options.engine
        weights = find_weights(engine.model, engine.checkpoint, engine.download, True, log, download_progress)
        self.device = resolve_device(engine.device)
        self.predictor = build_predictor(engine.spec, weights, self.device, engine.image_size,
                                         engine.compile and not options.naive, log)
        self.image_size = self.predictor.image_size
        self.supports = {s.name: s for s in supports}
        self.labels = labels
        # the most slices any support has a label drawn on: each is a prompt memory its tracks attend to
        drawn = [drawn_slices(s.labels) for s in supports]  # one search of each support, not one per label
        self.most_prompts = max((len(d.get(label, [])) for d in drawn for label in labels), default=0)
        self.naive = options.naive
        self.log = log
        # one per support and query grid; queries of other grids evict the least recently used
        self._memories: OrderedDict[tuple, SupportMemory] = OrderedDict()
        self._video_batch: int | None = None  # set when the GPU ran out of memory on a larger batch
        self._encode_chunk = encode_chunk(self.device, self.image_size)

    def _frames(self, volume: SliceVolume) -> VolumeFrames:
        return VolumeFrames(volume.slices, self.image_size, self.device)

    def _memory_key(self, name: str, query: SliceVolume) -> tuple:
        n_query, height, width = query.slices.shape
        video_length = n_query + len(self.supports[name].slices)
        # SAM2 reads the video's length only to bound pointer look-back: beyond that bound all lengths agree
        return name, height, width, min(video_length, self.predictor.max_obj_ptrs_in_encoder)

    def _memory(self, name: str, query: SliceVolume) -> SupportMemory:
        support = self.supports[name]
        key = self._memory_key(name, query)
        if key not in self._memories:
            _, height, width, _ = key
            masks = support_masks(support.labels, height, width)
            self._memories[key] = SupportMemory(self.predictor, self._frames(support), masks, self.labels,
                                                len(query.slices) + len(support.slices), height, width,
                                                FeatureStore(self.device))
            while len(self._memories) > 2 * len(self.supports):
                self._memories.popitem(last=False)
        self._memories.move_to_end(key)
        return self._memories[key]

    def track_bytes(self, slices: int) -> int:
        """GPU memory one (label, video) track of a query takes while tracked: its largest memory bank in a step
        (every prompted slice of its label in the most prompted support, the recent memories, the object
        pointers) and its outputs kept on the device (logits and presence of every query slice)."""
        tokens = (self.image_size // 16) ** 2  # one frame's memory (the backbone's stride 16)
        prompts, predictor = self.most_prompts, self.predictor
        pointers = (prompts + predictor.max_obj_ptrs_in_encoder) * max(1, predictor.hidden_dim // predictor.mem_dim)
        bank = (prompts + predictor.num_maskmem) * tokens + pointers
        outputs = slices * (4 * (self.image_size // 4) ** 2 + 4)
        return bank * (BANK_TOKEN_BYTES + 4 * tokens) + outputs

    def query_bytes(self, slices: int, videos: int) -> int:
        """GPU memory one query adds to a batch: its slices' features and its tracks (`videos` per support)."""
        return frame_feature_bytes(self.image_size) * slices + videos * len(self.labels) * self.track_bytes(slices)

    def fits(self, costs: list[int]) -> bool:
        """Whether queries of these `query_bytes` go in one batch. On a GPU a tracking step costs its latency, so
        the videos of several queries share each step: up to 8 queries whose features and tracks take under 40 %
        of the free memory. On a CPU one query: a step costs its arithmetic, more queries would only hold more."""
        if self.device.type != "cuda" or self.naive:
            return len(costs) <= 1
        free, _ = torch.cuda.mem_get_info(self.device)
        return len(costs) <= 1 or (len(costs) <= 8 and sum(costs) <= GPU_FEATURE_SHARE * free)

    def _query_store(self, queries: list[SliceVolume]) -> FeatureStore:
        """Every video reads each query slice: their features stay in memory (CPU memory at worst)."""
        slices = sum(len(q.slices) for q in queries)
        return FeatureStore(feature_device(self.device, self.image_size, slices) or "cpu")

    def _track(self, videos: list[QueryVideos], store: FeatureStore, memory: SupportMemory,
               progress=None) -> list[list[VideoResult]]:
        """One support's videos of these queries as one batch; smaller batches, then query features in CPU
        memory, when the GPU runs out of memory."""
        size = self._video_batch or sum(len(v.ks) for v in videos)
        parts = [(q, QueryVideos(v.frames, v.name, v.ks[start:start + size]))
                 for q, v in enumerate(videos) for start in range(0, len(v.ks), size)]
        batches: list[list] = [[]]
        for part in parts:  # consecutive parts, at most `size` videos per batch
            if batches[-1] and sum(len(p.ks) for _, p in batches[-1]) + len(part[1].ks) > size:
                batches.append([])
            batches[-1].append(part)
        reported = 0

        def step(slices: int) -> None:
            nonlocal reported
            reported += slices
            if progress is not None:
                progress.update(slices)

        try:
            results: list[list[VideoResult]] = [[] for _ in videos]
            for batch in batches:
                tracked = track_queries_cached(self.predictor, [p for _, p in batch], store, memory,
                                               self._encode_chunk, on_step=step)
                for (q, _), found in zip(batch, tracked):
                    results[q].extend(found)
            return results
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
            return self._track(videos, store, memory, progress)

    def pseudo_label_many(self, queries: list[SliceVolume], positions: list[dict[str, list[int]]],
                          progress=None) -> list[PseudoLabel]:
        """Several queries at once: each support's videos for all of them are tracked as one batch (queries of
        the same in-plane size; others in batches of their own). `progress` counts query slices tracked."""
        means = [ProbabilityMean(self.labels, *q.slices.shape) for q in queries]
        frames = [self._frames(q) for q in queries]
        if progress is not None:
            progress.reset(total=sum(len(q.slices) * sum(len(p) for p in pos.values())
                                     for q, pos in zip(queries, positions)))
        if self.naive:
            for query, query_frames, pos, mean in zip(queries, frames, positions, means):
                _, height, width = query.slices.shape
                for name, ks in pos.items():
                    support = self.supports[name]
                    support_frames = self._frames(support)
                    masks = support_masks(support.labels, height, width)
                    for k in ks:
                        mean.add(track_video_naive(self.predictor, query_frames, support_frames, masks, self.labels, k))
                        if progress is not None:
                            progress.update(len(query.slices))
            return [mean.finish() for mean in means]
        store = self._query_store(queries)
        for name in dict.fromkeys(name for pos in positions for name in pos):  # supports, in order of first use
            groups: dict[tuple, list[int]] = {}
            for q, pos in enumerate(positions):
                if name in pos:
                    groups.setdefault(self._memory_key(name, queries[q]), []).append(q)
            for members in groups.values():
                memory = self._memory(name, queries[members[0]])
                videos = [QueryVideos(frames[q], q, positions[q][name]) for q in members]
                for q, results in zip(members, self._track(videos, store, memory, progress)):
                    for result in results:
                        means[q].add(result)
        return [mean.finish() for mean in means]
