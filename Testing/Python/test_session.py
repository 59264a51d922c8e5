"""A volume session encodes each slice once and re-propagates from its cached features with the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, seeds_on, synthetic_case

from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.models import get_model
from sslmedsam2.models.loader import build_predictor
from sslmedsam2.propagation.sam2_propagation import run_passes
from sslmedsam2.propagation.seeds import Seeds
from sslmedsam2.propagation.session import Cancelled, VolumeSession


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
    assert np.array_equal(a.labels, b.labels)
    keys_a, values_a = _fields(a)
    keys_b, values_b = _fields(b)
    assert keys_a == keys_b
    assert np.allclose(values_a, values_b, atol=1e-4, equal_nan=True)


def test_cached_features_give_sams_own_numbers(predictor, volume):
    slices, labels = volume
    seeds = Seeds(seeds_on(labels, {1: [4, 9], 2: [7]}))
    cached = VolumeSession(predictor, slices, features_on="cpu")
    uncached = VolumeSession(predictor, slices, features_on=None)  # sam2 encodes each frame as a pass reads it
    _same(cached.propagate(seeds), uncached.propagate(seeds))
    raw_cached = run_passes(predictor, cached.frames, seeds, store=cached.store)[0]
    raw_uncached = run_passes(predictor, uncached.frames, seeds)[0]
    assert torch.allclose(raw_cached, raw_uncached, atol=1e-4)


def test_each_slice_is_encoded_once_across_propagations(predictor, volume, monkeypatch):
    slices, labels = volume
    session = VolumeSession(predictor, slices, features_on="cpu")
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
    _same(again, VolumeSession(predictor, slices, features_on=None).propagate(Seeds(edited)))


def test_a_session_can_be_cancelled_between_steps(predictor, volume):
    slices, labels = volume
    session = VolumeSession(predictor, slices, features_on="cpu")
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
        VolumeSession(predictor, slices, features_on="cpu").propagate(Seeds(np.ones((3, 4, 5), np.uint8)))


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
