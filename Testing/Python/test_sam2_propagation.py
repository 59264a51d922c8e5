"""SAM2 propagation with the real sam2 code and random weights loaded through the users' checkpoint path."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import TINY_SIZE

from sslmedsam2.cli import main
from sslmedsam2.errors import UserError
from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.models import get_model
from sslmedsam2.propagation.builder import build_predictor
from sslmedsam2.labelmap.confidence import read_confidence
from sslmedsam2.propagation.sam2_propagation import fuse
from sslmedsam2.labelmap.seeds import Seeds

SAM2_ARGS = ["--method", "sam2", "--model", "sam2.1-tiny", "--image-size", str(TINY_SIZE), "--device", "cpu"]


def test_propagate_two_labels_from_several_slices(case_files, tiny_checkpoint, tmp_path, monkeypatch):
    image_path, seeds_path, _ = case_files
    from sslmedsam2.propagation import batched

    directions = []
    original_run_tracks = batched.run_tracks

    def spy(predictor, state, passes, *args, **kwargs):
        directions.extend((reverse, list(order)) for order, reverse, _ in passes)
        return original_run_tracks(predictor, state, passes, *args, **kwargs)

    monkeypatch.setattr(batched, "run_tracks", spy)
    out = tmp_path / "out.nii.gz"
    assert main(["propagate", str(image_path), str(seeds_path), "-o", str(out), "--checkpoint", str(tiny_checkpoint),
                 *SAM2_ARGS]) == 0

    image, result, seeds = (sitk.ReadImage(str(p)) for p in (image_path, out, seeds_path))
    assert result.GetSize() == image.GetSize()
    assert result.GetSpacing() == image.GetSpacing() and result.GetOrigin() == image.GetOrigin()
    assert result.GetDirection() == image.GetDirection()
    labels, drawn = sitk.GetArrayFromImage(result), sitk.GetArrayFromImage(seeds)
    assert set(np.unique(labels)) <= {0, 1, 2}
    for label, slices in {1: [6, 11, 16], 2: [10, 15]}.items():
        for z in slices:
            np.testing.assert_array_equal(labels[z] == label, drawn[z] == label)

    # forward from the first seed to the end, backward from the last seed to the start
    assert [(rev, order[0], order[-1]) for rev, order in directions] == [(False, 6, 23), (True, 16, 0)]
    rows = read_confidence(tmp_path / "out.confidence.csv")
    assert len(rows) == 2 * 24
    by_key = {(r.slice, r.label): r for r in rows}
    assert by_key[(2, 1)].source == "backward" and by_key[(20, 1)].source == "forward"
    assert by_key[(8, 1)].source == "both" and by_key[(11, 1)].source == "seed"
    assert by_key[(12, 2)].source == "both" and by_key[(5, 2)].source == "backward"
    for r in rows:
        assert r.source == "seed" or 0.0 <= r.confidence <= 1.0
        assert r.voxels == int((labels[r.slice] == r.label).sum())


def _stock_and_ours(checkpoint, tmp_path, n=30, seed_frame=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    slices = rng.integers(0, 255, size=(n, 40, 40), dtype=np.uint8)
    for i, s in enumerate(slices):
        Image.fromarray(s).save(tmp_path / f"{i:05d}.jpg")
    predictor = build_predictor(get_model("sam2.1-tiny"), checkpoint, "cpu", TINY_SIZE)
    frames = VolumeFrames(slices, TINY_SIZE)
    mask = np.zeros((40, 40), bool)
    mask[10:25, 12:30] = True
    stock = predictor.init_state(str(tmp_path))
    stock["images"] = torch.stack([frames[i] for i in range(n)])  # same input: the comparison is of tracking only
    stock["cached_features"] = {}
    ours = predictor.init_state_from_frames(frames, 40, 40)
    assert set(ours) == set(stock), "state layout drifted from sam2's init_state"
    for state in (stock, ours):
        predictor.add_new_mask(state, seed_frame, 1, mask)
    return predictor, stock, ours


@pytest.mark.parametrize("reverse", [False, True])
def test_tracking_equals_stock_sam2_video_propagation(tiny_checkpoint, tmp_path, reverse):
    """Same logits as sam2's propagate_in_video, although old outputs are released along the way."""
    n = 30
    seed = n - 4 if reverse else 3
    predictor, stock, ours = _stock_and_ours(tiny_checkpoint, tmp_path, n, seed)
    expected = {f: m.clone() for f, _, m in predictor.propagate_in_video(stock, reverse=reverse, start_frame_idx=seed)}
    order = range(seed, -1, -1) if reverse else range(seed, n)
    got = {f: m for f, _, m, _ in predictor.track(ours, order, reverse=reverse, objects=lambda z: [0])}
    assert sorted(got) == sorted(expected)
    for f in got:
        up = torch.nn.functional.interpolate(got[f], size=(40, 40), mode="bilinear", align_corners=False)
        torch.testing.assert_close(up, expected[f], atol=1e-4, rtol=0)
    kept = ours["output_dict_per_obj"][0]["non_cond_frame_outputs"]
    assert len(kept) <= predictor.memory_window, "tracking kept every frame's memory"


def test_overlap_goes_to_the_highest_score_and_absent_slices_stay_empty():
    n, low = 3, 4
    logits = torch.full((2, n, low, low), -5.0)
    logits[0, 1] = 2.0
    logits[1, 1, :, :2] = 4.0  # both labels claim the left half of slice 1: label 2 scores higher
    logits[:, 2] = -1024.0  # SAM2's "object absent" score
    seeds = np.zeros((n, 8, 8), np.uint8)
    seeds[0, :2, :2] = 1
    seeds[0, 6:, 6:] = 2
    covered = torch.ones(2, n, 2, dtype=torch.bool)
    result = fuse(logits, torch.full((2, n), 0.9), torch.ones(2, n), covered, Seeds(seeds), 8, 8)
    assert (result.labels[1, :, :3] == 2).all() and (result.labels[1, :, 5:] == 1).all()
    assert not result.labels[2].any()
    np.testing.assert_array_equal(result.labels[0], seeds[0])


@pytest.mark.parametrize("label", [3, 300], ids=["uint8 map", "uint16 map"])
def test_one_label_fuses_as_it_does_beside_a_label_that_never_wins(label):
    """One label skips the contest between labels; its map and figures are those the contest gives."""
    n, low = 4, 4
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(1, n, low, low, generator=generator) * 3
    logits[0, 3, 0, 0] = -10.0  # where the other label's seed voxel goes: the label is absent there anyway
    seeds = np.zeros((n, 8, 8), np.uint16 if label > 255 else np.uint8)
    seeds[0, 2:5, 2:5] = label
    alone = fuse(logits, torch.full((1, n), 0.8), torch.ones(1, n), torch.ones(1, n, 2, dtype=torch.bool),
                 Seeds(seeds), 8, 8)
    never = label + 1
    seeds_two = seeds.copy()
    seeds_two[3, 0, 0] = never  # a second label, seeded on one voxel, whose logits lose everywhere
    two = fuse(torch.cat([logits, torch.full_like(logits, -50.0)]), torch.full((2, n), 0.8), torch.ones(2, n),
               torch.ones(2, n, 2, dtype=torch.bool), Seeds(seeds_two), 8, 8)
    expected = two.labels.copy()
    expected[expected == never] = 0
    assert alone.labels.dtype == two.labels.dtype
    np.testing.assert_array_equal(alone.labels, expected)
    assert (alone.labels == label).any() and (alone.labels[1:] == 0).any()
    assert alone.confidence == [r for r in two.confidence if r.label == label]


def test_checkpoint_saved_at_one_size_loads_at_another(tiny_checkpoint):
    predictor = build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", 256)
    assert predictor.image_size == 256


@pytest.mark.parametrize("content, message", [
    (b"definitely not a checkpoint", "not a readable"),
    ("wrong-model", "do not fit|Error"),
    ("no-model-key", "no 'model'"),
])
def test_bad_checkpoints_are_user_errors(tmp_path, tiny_checkpoint, content, message):
    path = tmp_path / "bad.pt"
    if content == "wrong-model":
        state = torch.load(tiny_checkpoint, weights_only=True)["model"]
        torch.save({"model": {k: v for i, (k, v) in enumerate(state.items()) if i % 2}}, path)
    elif content == "no-model-key":
        torch.save({"weights": {}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        build_predictor(get_model("sam2.1-tiny"), path, "cpu", TINY_SIZE)
