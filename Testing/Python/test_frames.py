"""Intensity normalisation and in-memory frames match what SAM2's own JPEG loader would feed the model."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
from PIL import Image

from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec, to_uint8
from sslmedsam2.frames.intensity import nonzero_percentiles
from sslmedsam2.frames.video import VolumeFrames


def test_mri_percentiles_of_nonzero_voxels_and_zeros_stay_zero():
    rng = np.random.default_rng(1)
    volume = rng.uniform(100, 200, size=(4, 20, 20)).astype(np.float32)
    volume[:, :5] = 0
    volume[0, 10, 10] = 10_000  # an outlier above the 99.5th percentile
    out = to_uint8(volume, IntensitySpec("mri"))
    assert out.dtype == np.uint8
    assert (out[:, :5] == 0).all()
    assert out[0, 10, 10] == 255
    low, high = np.percentile(volume[volume != 0], (0.5, 99.5))
    inside = (volume > low) & (volume < high)
    expected = np.rint((volume[inside] - low) / (high - low) * 255)
    assert np.abs(out[inside].astype(int) - expected).max() <= 1


def _numpys(values, qs):
    kept = values[(values != 0) & ~np.isnan(values)] if values.dtype.kind == "f" else values[values != 0]
    return np.percentile(kept, qs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8])
@pytest.mark.parametrize("size", [1, 7, 2_000_000])
def test_percentiles_are_numpys(dtype, size):
    """The same numbers as np.percentile of the non-zero voxels, whichever way an order statistic is found (a
    narrow window, or all values when the window misses), ties and extremes included."""
    rng = np.random.default_rng(size)
    values = (rng.standard_normal(size) * 50 + 100).clip(0, 250).astype(dtype)
    values[1::3] = 0
    qs = (0.0, 0.5, 7.3, 50.0, 99.5, 100.0)
    np.testing.assert_array_equal(nonzero_percentiles(values, qs), _numpys(values, qs))
    np.testing.assert_array_equal(nonzero_percentiles(values, (0.5, 99.5)), _numpys(values, (0.5, 99.5)))


def test_percentiles_of_a_volume_in_any_layout_without_zeros_or_nan():
    """A view of a volume (slices along another axis), negative values below the zeros, NaN voxels: the values are
    counted in blocks, never copied out."""
    rng = np.random.default_rng(4)
    volume = (rng.standard_normal((40, 160, 170)) * 60 + 20).astype(np.float32)  # about a third below zero
    volume[:, :30] = 0
    volume[5, 7, :9] = np.nan
    view = np.moveaxis(volume, 2, 0)
    qs = (0.5, 25.0, 99.5)
    for values in (volume, view, np.abs(view)):
        np.testing.assert_array_equal(nonzero_percentiles(values, qs), _numpys(values, qs))
    assert nonzero_percentiles(np.zeros((3, 4, 5)), qs) is None
    assert nonzero_percentiles(np.full((3, 4, 5), np.nan), qs) is None


def test_percentiles_when_the_sample_misleads():
    values = np.zeros(3_000_000, np.float32)
    values[::45] = 1000 + np.arange(values[::45].size, dtype=np.float32)  # all the strided sample sees
    values[-500_000:] = -1.0
    qs = (0.5, 20.0, 99.5)
    np.testing.assert_array_equal(nonzero_percentiles(values, qs), _numpys(values, qs))


@pytest.mark.parametrize("spec", [IntensitySpec("mri"), IntensitySpec("ct"), IntensitySpec(value_range=(90.0, 180.0))],
                         ids=["mri", "ct", "range"])
def test_rescaling_in_chunks_equals_the_whole_volume_at_once(spec):
    """to_uint8 works a few slices at a time; every chunk boundary gives what one pass over the volume gives."""
    rng = np.random.default_rng(3)
    volume = np.moveaxis(rng.uniform(60, 220, size=(30, 21, 17)).astype(np.float32), 1, 0)  # 21 slices, a view
    volume[4, 2:5] = 0
    volume[9, 0, 0] = np.nan
    low, high = spec.bounds(volume)
    whole = np.fmin(np.fmax((volume.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low)), 0), 255)
    if spec.modality == "mri" and spec.value_range is None:
        whole[volume == 0] = 0
    np.testing.assert_array_equal(to_uint8(volume, spec), np.rint(whole).astype(np.uint8))


def test_nan_voxels_are_not_counted_and_become_zero():
    rng = np.random.default_rng(2)
    volume = rng.uniform(100, 200, size=(8, 30, 30)).astype(np.float32)
    volume[0, :3] = np.nan
    spec = IntensitySpec("mri")
    assert spec.bounds(volume) == tuple(np.nanpercentile(volume, (0.5, 99.5)))
    out = to_uint8(volume, spec)
    assert (out[0, :3] == 0).all() and out[1:].max() == 255


def test_ct_window_and_explicit_range():
    volume = np.array([[[-1000, -160, 40, 240, 3000]]], np.float32)
    assert to_uint8(volume, IntensitySpec("ct")).tolist() == [[[0, 0, 128, 255, 255]]]
    assert to_uint8(volume, IntensitySpec(value_range=(-1000, 3000))).tolist() == [[[0, 54, 66, 79, 255]]]


@pytest.mark.parametrize("spec, fragment", [
    (dict(modality="pet"), "unknown modality"), (dict(modality="pet", value_range=(0, 1)), "unknown modality"),
    (dict(modality="ct", window="nope"), "unknown CT window"), (dict(value_range=(5, 5)), "must be above"),
    (dict(value_range=(-math.inf, math.inf)), "finite"), (dict(value_range=(math.nan, 5)), "finite")])
def test_bad_intensity_options_are_user_errors(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        IntensitySpec(**spec)


def test_frames_are_lazy_and_shaped_for_sam2():
    slices = np.random.default_rng(0).integers(0, 256, size=(600, 64, 48), dtype=np.uint8)
    frames = VolumeFrames(slices, 128)
    assert len(frames) == 600
    frame = frames[599]
    assert frame.shape == (3, 128, 128) and frame.dtype == torch.float32
    assert frames.height == 64 and frames.width == 48
    with pytest.raises(IndexError):
        frames[600]


def test_frames_match_sam2_jpeg_loader(tmp_path):
    """The same slice through sam2's own loader (JPEG, PIL bicubic) gives nearly the same input tensor."""
    from sam2.utils.misc import load_video_frames

    yy, xx = np.mgrid[0:40, 0:56]
    slices = np.stack([((np.sin(yy / 5) + np.cos(xx / 7) + 2) * 60).astype(np.uint8)] * 2)
    for i, s in enumerate(slices):
        Image.fromarray(s).save(tmp_path / f"{i:05d}.jpg", quality=100)
    theirs, h, w = load_video_frames(str(tmp_path), image_size=128, offload_video_to_cpu=True, compute_device="cpu")
    ours = VolumeFrames(slices, 128)[0]
    assert (h, w) == (40, 56)
    # JPEG at quality 100 and 8-bit rounding of the resized image differ from float resizing by a few grey levels
    assert (ours - theirs[0]).abs().mean() < 0.03
    assert torch.corrcoef(torch.stack([ours.flatten(), theirs[0].flatten()]))[0, 1] > 0.999


@pytest.mark.parametrize("value_range", [(-3e38, 3e38), (1.0, 1.0 + 1e-9), (-1e31, 0.0)])
def test_an_explicit_range_float32_cannot_map_is_refused(value_range):
    from sslmedsam2.errors import UserError
    from sslmedsam2.frames import IntensitySpec

    with pytest.raises(UserError, match="float32"):
        IntensitySpec(value_range=value_range)
