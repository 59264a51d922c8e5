"""A volume session encodes each slice once and re-propagates from its cached features with the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, seeds_on, synthetic_case

from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.models import get_model
from sslmedsam2.propagation.builder import build_predictor
from sslmedsam2.propagation.sam2_propagation import run_passes
from sslmedsam2.labelmap.seeds import Seeds
from sslmedsam2.jobs import Cancelled
from sslmedsam2.propagation.tracker import VolumeTracker


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)


@pytest.fixture(scope="module")
def volume():
    image, labels = synthetic_case(shape=(14, 40, 44))
    return to_uint8(image, IntensitySpec()), labels


def _count_encodes(predictor, monkeypatch) -> list[int]:
    calls = []
    original = type(predictor).forward_image

    def counting(self, image):
        calls.append(image.shape[0])
        return original(self, image)

    monkeypatch.setattr(type(predictor), "forward_image", counting)
    return calls


def _fields(result):
    return [(r.slice, r.label, r.source, r.present, r.voxels) for r in result.confidence], \
        np.array([[r.presence, r.certainty, r.agreement, r.confidence] for r in result.confidence], float)


def _same(a, b) -> None:
    """Equal up to float rounding: a random-weight SAM2 leaves some pixels at a near-tie, where a difference of
    1e-7 in a logit may flip one voxel (and its slice's voxel count)."""
    differ = a.labels != b.labels
    assert differ.sum() <= max(2, differ.size // 10000)
    keys_a, values_a = _fields(a)
    keys_b, values_b = _fields(b)
    assert [k[:4] for k in keys_a] == [k[:4] for k in keys_b]
    assert all(abs(x[4] - y[4]) <= differ.sum() for x, y in zip(keys_a, keys_b))
    assert np.allclose(values_a, values_b, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("pad", [True, False], ids=["padded as on a GPU", "grouped by bank as on a CPU"])
def test_batched_tracks_give_sams_own_numbers(predictor, volume, monkeypatch, pad):
    """Cached features and every label's two passes batched (memory banks of different lengths padded and masked,
    or attended in groups of equal banks): sam2's per-track numbers."""
    from sslmedsam2.propagation import attention, batched

    monkeypatch.setattr(attention, "AS_ON_GPU", pad)
    slices, labels = volume
    seeds = Seeds(seeds_on(labels, {1: [4, 9], 2: [7]}))
    padded = []
    original = batched.memory_bank.assemble

    def spy(predictor_, selections, device, capacity=None):
        result = original(predictor_, selections, device, capacity)
        padded.append((len(selections), result[3] is not None))
        return result

    monkeypatch.setattr(batched.memory_bank, "assemble", spy)
    cached = VolumeTracker(predictor, slices, features_on="cpu")
    uncached = VolumeTracker(predictor, slices, features_on=None)  # sam2 encodes each frame as a pass reads it
    _same(cached.propagate(seeds), uncached.propagate(seeds))
    raw_cached = run_passes(predictor, cached.frames, seeds, store=cached.store)[0]
    raw_uncached = run_passes(predictor, uncached.frames, seeds)[0]
    assert torch.allclose(raw_cached, raw_uncached, atol=1e-4)
    if pad:
        assert max(size for size, _ in padded) == 4, "both labels' two passes were not tracked in one batch"
        assert any(mask for _, mask in padded), "no step had memory banks of different lengths: padding untested"
    else:
        assert not any(mask for _, mask in padded), "a CPU step attended over padding"
        assert any(size < 4 for size, _ in padded) and max(size for size, _ in padded) > 1


def test_each_slice_is_encoded_once_across_propagations(predictor, volume, monkeypatch):
    slices, labels = volume
    session = VolumeTracker(predictor, slices, features_on="cpu")
    calls = _count_encodes(predictor, monkeypatch)
    session.propagate(Seeds(seeds_on(labels, {1: [4, 9], 2: [7]})))
    assert sum(calls) == len(slices)
    assert session.feature_bytes() > 0
    edited = seeds_on(labels, {1: [4, 6, 9], 2: [7]})  # a corrected slice in the middle
    again = session.propagate(Seeds(edited))
    assert sum(calls) == len(slices), "a re-propagation encoded slices again"
    session.drop_features()
    _same(session.propagate(Seeds(edited)), again)
    assert sum(calls) == 2 * len(slices)
    _same(again, VolumeTracker(predictor, slices, features_on=None).propagate(Seeds(edited)))


def test_a_session_can_be_cancelled_between_steps(predictor, volume):
    slices, labels = volume
    session = VolumeTracker(predictor, slices, features_on="cpu")
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 5

    with pytest.raises(Cancelled):
        session.propagate(Seeds(seeds_on(labels, {1: [4, 9]})), should_stop=stop)
    assert len(asked) == 6
    result = session.propagate(Seeds(seeds_on(labels, {1: [4, 9]})))  # the session still works afterwards
    assert result.labels.shape == slices.shape


def test_seeds_on_another_grid_are_refused(predictor, volume):
    slices, _ = volume
    with pytest.raises(ValueError):
        VolumeTracker(predictor, slices, features_on="cpu").propagate(Seeds(np.ones((3, 4, 5), np.uint8)))


def test_a_checkpoint_build_skips_random_initialisation_and_loads_every_weight(tiny_checkpoint):
    drawn = []
    original = torch.nn.init.kaiming_uniform_

    def spy(tensor, *args, **kwargs):
        drawn.append(tensor.shape)
        return original(tensor, *args, **kwargs)

    torch.nn.init.kaiming_uniform_ = spy
    try:
        built = build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)
    finally:
        torch.nn.init.kaiming_uniform_ = original
    assert drawn == [], "random weights were drawn before the checkpoint replaced them"
    assert torch.nn.init.kaiming_uniform_ is original
    saved = torch.load(tiny_checkpoint, weights_only=True)["model"]
    state = built.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)


def test_weights_stored_in_bf16_give_autocasts_numbers(tiny_checkpoint, volume):
    """On CUDA the linear and convolution weights are converted to bf16 once (loader.autocast_weights_in_bf16)
    instead of by autocast at every call: the same numbers, checked here under CPU bf16 autocast."""
    import copy

    from sslmedsam2.frames.video import VolumeFrames
    from sslmedsam2.propagation.builder import autocast_weights_in_bf16

    reference = build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)
    converted = copy.deepcopy(reference)
    autocast_weights_in_bf16(converted)
    assert converted.image_encoder.trunk.blocks[0].mlp.layers[0].weight.dtype == torch.bfloat16
    assert converted.image_encoder.trunk.blocks[0].norm1.weight.dtype == torch.float32
    frames = VolumeFrames(volume[0][:2], TINY_SIZE).stack([0, 1])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = reference.forward_image(frames), converted.forward_image(frames)
    for a, b in zip(expected["backbone_fpn"], got["backbone_fpn"]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_frames_of_a_batch_equal_frames_made_one_by_one(volume):
    from sslmedsam2.frames.video import VolumeFrames

    frames = VolumeFrames(volume[0], TINY_SIZE)
    batch = frames.stack([3, 0, 7])
    assert all(torch.equal(batch[i], frames[z]) for i, z in enumerate([3, 0, 7]))
