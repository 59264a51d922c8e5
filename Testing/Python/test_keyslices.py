"""Key-slice selection (continuity, spread, certainty, per label) and the `keyslices` command. No torch needed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ellipsoid, to_image

from sslmedsam2.cli import main
from sslmedsam2.labelmap.confidence import SliceConfidence, confidence_path, write_confidence
from sslmedsam2.refine.keyslices import continuity, largest_component, seed_map, select_key_slices

SHAPE = (30, 40, 40)


def _tube() -> np.ndarray:
    """Label 1 on slices 4..25 (an elongated ellipsoid), label 2 a small ball on slices 8..14."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[ellipsoid(SHAPE, (14.5, 14, 14), (11, 8, 8))] = 1
    labels[ellipsoid(SHAPE, (11, 30, 30), (3.5, 5, 5))] = 2
    return labels


def _extent(labels, label):
    present = np.flatnonzero((labels == label).any(axis=(1, 2)))
    return int(present[0]), int(present[-1])


def test_continuity_is_the_worse_neighbour_and_zero_off_the_component():
    labels = _tube()
    mask = labels == 1
    first, last = _extent(labels, 1)
    score = continuity(mask, largest_component(mask))
    assert score[first] == 0 and score[last] == 0, "an end slice does not continue on its outer side"
    assert score[: first].max() == 0 and score[last + 1:].max() == 0
    middle = (first + last) // 2
    assert score[middle] > 0.9
    # a slice displaced sideways breaks the continuity of itself and of both its neighbours
    broken = labels.copy()
    broken[middle] = np.roll(labels[middle], 12, axis=1)
    mask = broken == 1
    score = continuity(mask, largest_component(mask))
    assert score[middle] < 0.3 and score[middle - 1] < 0.6 and score[middle + 1] < 0.6


def test_spread_over_the_extent_one_per_part_per_label():
    labels = _tube()
    keys = select_key_slices(labels, per_label=3, min_continuity=0.6)
    for label in (1, 2):
        first, last = _extent(labels, label)
        mine = [k for k in keys if k.label == label]
        parts = [list(p) for p in np.array_split(np.arange(first, last + 1), 3)]
        assert [k.part for k in mine] == [(p[0], p[-1]) for p in parts]
        assert all(k.part[0] <= k.slice <= k.part[1] and k.continuity >= 0.6 for k in mine)
        assert first not in [k.slice for k in mine] and last not in [k.slice for k in mine]
        assert all(math.isnan(k.certainty) for k in mine)
    # without certainty the most continuous slice of each part wins
    mask = labels == 1
    score = continuity(mask, largest_component(mask))
    for key in (k for k in keys if k.label == 1):
        assert score[key.slice] == max(score[key.part[0]: key.part[1] + 1])


def test_certainty_decides_within_a_part_but_never_against_continuity():
    labels = _tube()
    first, last = _extent(labels, 1)
    certainty = np.full(SHAPE[0], 0.5)
    broken_slice = first + 5
    labels[broken_slice] = np.where(labels[broken_slice] == 1, 0, labels[broken_slice])
    labels[broken_slice][13:16, 13:16] = 1  # a sliver: still connected, but it does not continue its neighbours
    certainty[broken_slice] = 1.0  # the most certain slice, but broken
    certainty[first + 2] = 0.9
    certainty[last - 3] = 0.95
    keys = select_key_slices(labels, per_label=2, min_continuity=0.5, certainty={1: certainty}, label_values=[1])
    chosen = [k.slice for k in keys]
    assert broken_slice not in chosen
    assert chosen == [first + 2, last - 3]
    assert [k.certainty for k in keys] == [0.9, 0.95]


def test_stray_pieces_lower_continuity_and_stay_out_of_the_seeds():
    labels = _tube()
    middle = 14
    labels[middle][30:38, 2:10] = 1  # a stray piece on one slice, not connected to the structure
    mask = labels == 1
    score = continuity(mask, largest_component(mask))
    assert score[middle] < continuity(_tube() == 1, largest_component(_tube() == 1))[middle]
    keys = select_key_slices(labels, per_label=1, min_continuity=0.0, label_values=[1])
    seeds = seed_map(labels, [*keys, type(keys[0])(1, middle, 0.0, math.nan, (middle, middle))])
    assert not seeds[middle][30:38, 2:10].any(), "seeds hold the label's largest 3D component only"
    assert (seeds[middle] == 1).sum() == (largest_component(mask)[middle]).sum()
    assert keys[0].slice != middle, "the slice with the stray piece is no longer the most continuous"


def test_a_label_too_thin_to_continue_gets_no_key_slice():
    labels = np.zeros(SHAPE, np.uint8)
    labels[10:12, 10:20, 10:20] = 1  # two slices: each has an empty neighbour
    labels[5:25, 25:35, 25:35] = 2
    keys = select_key_slices(labels, per_label=3, min_continuity=0.5)
    assert {k.label for k in keys} == {2} and len(keys) == 3
    seeds = seed_map(labels, keys)
    assert set(np.unique(seeds)) == {0, 2}
    assert sorted(np.flatnonzero(seeds.any(axis=(1, 2)))) == sorted(k.slice for k in keys)


# --- the command -----------------------------------------------------------------------------------------------

@pytest.fixture
def prediction(tmp_path):
    labels = _tube()
    path = tmp_path / "pred.nii.gz"
    sitk.WriteImage(to_image(labels), str(path))
    return path, labels


def _err(capsys, argv, fragment):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sslmedsam2: error: ") and fragment in err[-1], err


def test_command_writes_seeds_on_the_prediction_grid(prediction, tmp_path, capsys):
    path, labels = prediction
    out = tmp_path / "seeds.nrrd"
    assert main(["keyslices", str(path), "-o", str(out), "--per-label", "2"]) == 0
    seeds_image, source = sitk.ReadImage(str(out)), sitk.ReadImage(str(path))
    assert seeds_image.GetSize() == source.GetSize() and seeds_image.GetOrigin() == source.GetOrigin()
    seeds = sitk.GetArrayFromImage(seeds_image)
    for label in (1, 2):
        slices = np.flatnonzero((seeds == label).any(axis=(1, 2)))
        assert len(slices) == 2
        for z in slices:
            assert np.array_equal(seeds[z] == label, labels[z] == label)
    assert "label 1: slices" in capsys.readouterr().err


def test_command_uses_certainty_from_a_table_or_probability_maps(prediction, tmp_path):
    path, labels = prediction
    first, last = _extent(labels, 1)
    favourite = first + 3
    rows = [SliceConfidence(z, label, "nnunet", True, 1, 1.0, 0.99 if (label, z) == (1, favourite) else 0.5,
                            math.nan, 0.5) for z in range(SHAPE[0]) for label in (1, 2)]
    table = confidence_path(path)
    write_confidence(rows, table)
    out = tmp_path / "from_table.nii.gz"
    assert main(["keyslices", str(path), "-o", str(out), "--per-label", "1", "--prob", str(table)]) == 0
    assert np.flatnonzero((sitk.GetArrayFromImage(sitk.ReadImage(str(out))) == 1).any(axis=(1, 2))).tolist() == [favourite]
    prob = np.where(labels == 1, 0.6, 0.0).astype(np.float32)
    prob[last - 3][labels[last - 3] == 1] = 1.0
    prob_path = tmp_path / "case.prob_1.nii.gz"
    sitk.WriteImage(to_image(prob), str(prob_path))
    out = tmp_path / "from_maps.nii.gz"
    assert main(["keyslices", str(path), "-o", str(out), "--per-label", "1", "--prob", str(prob_path)]) == 0
    assert np.flatnonzero((sitk.GetArrayFromImage(sitk.ReadImage(str(out))) == 1).any(axis=(1, 2))).tolist() == [last - 3]
    out = tmp_path / "named.nii.gz"
    assert main(["keyslices", str(path), "-o", str(out), "--per-label", "1", "--prob", f"1={prob_path}"]) == 0


def test_command_axis(prediction, tmp_path):
    path, labels = prediction
    out = tmp_path / "coronal.nii.gz"
    assert main(["keyslices", str(path), "-o", str(out), "--per-label", "1", "--axis", "coronal"]) == 0
    seeds = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert len(np.flatnonzero((seeds == 1).any(axis=(0, 2)))) == 1  # numpy axis 1 runs across coronal slices here


def test_command_refuses_bad_input_and_writes_nothing(prediction, tmp_path, capsys):
    path, labels = prediction
    out = tmp_path / "seeds.nii.gz"
    _err(capsys, ["keyslices", str(path), "-o", str(path)], "is the input")
    _err(capsys, ["keyslices", str(path), "-o", str(out), "--per-label", "0"], "--per-label 0")
    _err(capsys, ["keyslices", str(path), "-o", str(out), "--min-continuity", "1.5"], "--min-continuity 1.5")
    _err(capsys, ["keyslices", str(tmp_path / "missing.nii.gz"), "-o", str(out)], "no such file")
    empty = tmp_path / "empty.nii.gz"
    sitk.WriteImage(to_image(np.zeros(SHAPE, np.uint8)), str(empty))
    _err(capsys, ["keyslices", str(empty), "-o", str(out)], "no labelled voxel")
    _err(capsys, ["keyslices", str(path), "-o", str(out), "--prob", str(tmp_path / "odd.nii.gz")], "name the label")
    _err(capsys, ["keyslices", str(path), "-o", str(out), "--prob", str(tmp_path / "a.prob_1.nii.gz")], "no such file")
    other = tmp_path / "other.prob_1.nii.gz"
    sitk.WriteImage(to_image(np.zeros((30, 40, 41), np.float32)), str(other))
    _err(capsys, ["keyslices", str(path), "-o", str(out), "--prob", str(other)], "differs from the image size")
    wild = tmp_path / "wild.prob_1.nii.gz"
    sitk.WriteImage(to_image(np.full(SHAPE, 3.0, np.float32)), str(wild))
    _err(capsys, ["keyslices", str(path), "-o", str(out), "--prob", str(wild)], "not probabilities")
    short = tmp_path / "short.confidence.csv"
    write_confidence([SliceConfidence(z, 1, "nnunet", True, 1, 1.0, 1.0) for z in range(5)], short)
    _err(capsys, ["keyslices", str(path), "-o", str(out), "--prob", str(short)], "covers 5 slices")
    thin = tmp_path / "thin.nii.gz"
    thin_labels = np.zeros(SHAPE, np.uint8)
    thin_labels[10, 10:20, 10:20] = 1
    sitk.WriteImage(to_image(thin_labels), str(thin))
    _err(capsys, ["keyslices", str(thin), "-o", str(out)], "lower it")
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_:
        main(["keyslices", "--help"])
    assert exit_.value.code == 0
