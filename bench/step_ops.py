"""Benchmark without a GPU: the operators a tracking step launches, by part (memory banks, model, the step's own
glue: features in, outputs out), and those around the steps (seeds, recording, fusion) per step.

On a GPU a tracking step is bound by its latency: the host launches each operator in turn, for a few ms of GPU
work in all. Counting operators on CPU, with the GPU's layout (every track in one padded call), therefore follows
the GPU's step time where no GPU is at hand. Random-weight SAM2.1 Hiera-T at image size 128 (the count does not
depend on the size); synthetic volumes.

  python bench/step_ops.py        propagation of 2 labels (4 tracks a step) and few-shot videos (5 insertions x 2
                                  labels: 10 tracks a step)

Last line: `propagation_ops_per_step=<n> fewshot_ops_per_step=<n>`.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "Python"))
from conftest import seeds_on, synthetic_case  # noqa: E402  (the test suite's synthetic volumes)

from sslmedsam2.fewshot import tracking  # noqa: E402
from sslmedsam2.frames import IntensitySpec, to_uint8  # noqa: E402
from sslmedsam2.frames.video import VolumeFrames  # noqa: E402
from sslmedsam2.models import get_model  # noqa: E402
from sslmedsam2.propagation.builder import build_predictor  # noqa: E402
from sslmedsam2.propagation import attention, batched, memory_bank  # noqa: E402
from sslmedsam2.propagation.features import FeatureStore  # noqa: E402
from sslmedsam2.labelmap.seeds import Seeds  # noqa: E402
from sslmedsam2.propagation.tracker import VolumeTracker  # noqa: E402


class _Counter(TorchDispatchMode):
    """Counts every operator that reaches the dispatcher, under the part being run."""

    def __init__(self) -> None:
        super().__init__()
        self.part, self.counts, self.steps = "around the steps", collections.Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.part] += 1
        return func(*args, **(kwargs or {}))


def _count_parts(counter: _Counter) -> None:
    """Attribute operators to the part that launches them, and count steps."""
    for owner, name, part in ((memory_bank, "assemble", "memory banks"), (batched, "model_step", "model")):
        original = getattr(owner, name)

        def wrapped(*args, _original=original, _part=part, **kwargs):
            outer, counter.part = counter.part, _part
            try:
                return _original(*args, **kwargs)
            finally:
                counter.part = outer

        setattr(owner, name, wrapped)
    step = batched.track_step

    def counted(*args, **kwargs):
        counter.steps += 1
        outer, counter.part = counter.part, "step glue"
        try:
            return step(*args, **kwargs)
        finally:
            counter.part = outer

    batched.track_step = tracking.track_step = counted


def _report(name: str, counter: _Counter) -> float:
    """Prints the parts; returns the operators of a step itself (what its latency follows)."""
    per_step = {part: count / counter.steps for part, count in counter.counts.items()}
    total = sum(count for part, count in per_step.items() if part != "around the steps")
    print(f"{name}: {counter.steps} steps, {total:.0f} operators a step ("
          + ", ".join(f"{part} {per_step.get(part, 0):.0f}" for part in ("memory banks", "model", "step glue"))
          + f"), and {per_step.get('around the steps', 0):.0f} a step around them", flush=True)
    return total


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    predictor = build_predictor(get_model("sam2.1-tiny"), None, "cpu", 128)
    attention.AS_ON_GPU = True  # the GPU's layout: one padded call for every track, sam2's attention
    counter = _Counter()
    _count_parts(counter)

    image, labels = synthetic_case(shape=(30, 40, 44))
    session = VolumeTracker(predictor, to_uint8(image, IntensitySpec()), features_on="cpu")
    seeds = Seeds(seeds_on(labels, {1: [4, 12, 20], 2: [10, 16]}))
    session.propagate(seeds)  # every slice encoded: the measured run tracks only
    counter.steps = 0
    with torch.inference_mode(), counter:
        session.propagate(seeds)
    propagation = _report("propagation, 2 labels", counter)

    support_image, support_labels = synthetic_case((20, 40, 40), seed=3)
    query_image, _ = synthetic_case((12, 40, 40), seed=4)
    support = VolumeFrames(to_uint8(support_image, IntensitySpec()), 128)
    query = VolumeFrames(to_uint8(query_image, IntensitySpec()), 128)
    masks = tracking.support_masks(support_labels, 40, 40)
    memory = tracking.SupportMemory(predictor, support, masks, [1, 2], len(query) + len(support), 40, 40,
                                    FeatureStore())
    store = FeatureStore()
    store.encode(predictor, query, [("query", z) for z in range(len(query))], 8)
    counter.counts.clear()
    counter.steps = 0
    with counter:
        tracking.track_videos_cached(predictor, query, store, memory, [0, 3, 6, 9, 12])
    fewshot = _report("few-shot, 5 videos x 2 labels", counter)
    print(f"propagation_ops_per_step={propagation:.0f} fewshot_ops_per_step={fewshot:.0f}")


if __name__ == "__main__":
    main()
