"""No tracking step makes the host wait for the GPU: on a GPU a step is bound by the host launching its operators,
and an operator that reads a result back (`.item()`, a boolean mask's size, `nonzero`) would stall every step
until the GPU caught up. Checked on CPU by the operators dispatched, with the GPU's padded layout."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SIZE, seeds_on, synthetic_case
from torch.utils._python_dispatch import TorchDispatchMode

from sslmedsam2.fewshot import tracking
from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.models import get_model
from sslmedsam2.propagation.builder import build_predictor
from sslmedsam2.propagation import attention, batched
from sslmedsam2.propagation.features import FeatureStore
from sslmedsam2.labelmap.seeds import Seeds
from sslmedsam2.propagation.tracker import VolumeTracker

# operators whose output size or value the host needs at once: on CUDA each waits for the queued work
WAITING = ("aten.item", "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
           "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.repeat_interleave.Tensor", "aten.where.default")


class _Waits(TorchDispatchMode):
    """Records the operators that would make the host wait, and boolean-mask indexing (a nonzero inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.operators = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators += 1
        name = str(func)
        indices = args[1] if name.startswith(("aten.index.", "aten.index_put")) and len(args) > 1 else ()
        if name.startswith(WAITING) or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           for i in (indices or ())):
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)


def _watched(monkeypatch, owner, name) -> _Waits:
    waits, original = _Waits(), getattr(owner, name)

    def watched(*args, **kwargs):
        with waits:
            return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, watched)
    return waits


def test_propagation_steps_never_wait_for_the_gpu(predictor, monkeypatch):
    monkeypatch.setattr(attention, "AS_ON_GPU", True)
    image, labels = synthetic_case(shape=(16, 40, 44))
    session = VolumeTracker(predictor, to_uint8(image, IntensitySpec()), features_on="cpu")
    seeds = Seeds(seeds_on(labels, {1: [4, 9], 2: [7]}))
    session.propagate(seeds)  # encoded: what is watched below is tracking and recording only
    waits = _watched(monkeypatch, batched, "run_tracks")
    session.propagate(seeds)
    assert waits.operators > 1000, "nothing was watched"
    assert waits.found == []


def test_fewshot_steps_never_wait_for_the_gpu(predictor, monkeypatch):
    monkeypatch.setattr(attention, "AS_ON_GPU", True)
    support_image, support_labels = synthetic_case((10, 40, 40), seed=3)
    query_image, _ = synthetic_case((9, 36, 44), seed=4)
    support = VolumeFrames(to_uint8(support_image, IntensitySpec()), TINY_SIZE)
    query = VolumeFrames(to_uint8(query_image, IntensitySpec()), TINY_SIZE)
    masks = tracking.support_masks(support_labels, 36, 44)
    memory = tracking.SupportMemory(predictor, support, masks, [1, 2], len(query) + len(support), 36, 44,
                                    FeatureStore())
    store = FeatureStore()
    store.encode(predictor, query, [("query", z) for z in range(len(query))], 4)
    waits = _watched(monkeypatch, tracking, "track_queries_cached")  # tracking and recording
    tracking.track_videos_cached(predictor, query, store, memory, [0, 3, 8])
    assert waits.operators > 1000, "nothing was watched"
    assert waits.found == []


@pytest.mark.parametrize("wait", [lambda v: v.sum().item(), lambda v: float(v.max()), lambda v: v[v > 2],
                                  lambda v: torch.nonzero(v), lambda v: bool(v.any())],
                         ids=["item", "float", "boolean mask", "nonzero", "bool"])
def test_the_watch_sees_a_host_wait(wait):
    """The check itself: each way of reading a GPU result back on the host is caught."""
    waits = _Waits()
    with torch.inference_mode(), waits:
        wait(torch.arange(6.0))
    assert waits.found, "not caught"
