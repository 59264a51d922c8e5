"""The study's model in the module, without Slicer: workspace label values into named segments, and the prompts of
"Refine with SAM2 from the best slices" (nnU-Net's key slices, the reviewer's slices, rejected slices left out),
with the engine's own `keyslices` writing the seed file the module reads back."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSLMedSAM2"))

from SSLMedSAM2Lib.parameters import keyslices_command  # noqa: E402
from SSLMedSAM2Lib.study_seeds import (key_slice_prompts, label_map, label_slots, read_label_array,  # noqa: E402
                                       slices_with_labels)

from sslmedsam2.cli import main  # noqa: E402


def test_workspace_values_land_in_their_named_segments():
    """ImportLabelmapToSegmentationNode gives value i + 1 to the i-th id and skips empty ids (Slicer 5.10)."""
    slots = label_slots({"kidney": 3, "liver": 1}, {"liver": "Segment_7", "kidney": "Segment_2"})
    assert slots == ["Segment_7", "", "Segment_2"]
    with pytest.raises(ValueError, match="positive"):
        label_slots({"background": 0}, {"background": "Segment_1"})


def test_label_map_and_slices():
    a = np.zeros((4, 5, 6), bool)
    b = np.zeros((4, 5, 6), bool)
    a[1, 1:3, 1:3] = True
    b[1, 2:4, 2:4] = True  # overlaps a at (1, 2, 2): the later segment wins, as Slicer's export
    b[3, 0, 0] = True
    labels = label_map([a, b])
    assert labels.dtype == np.uint8 and labels[1, 1, 1] == 1 and labels[1, 2, 2] == 2 and labels[3, 0, 0] == 2
    assert slices_with_labels(labels, 0) == [1, 3]
    assert slices_with_labels(labels, 2) == [0, 1, 2, 3]


@pytest.mark.parametrize("axis", [0, 2])
def test_key_slice_prompts(axis):
    """Key slices carry nnU-Net's masks in the segments' values; the reviewer's slices carry the segmentation as it
    is now (their edits), and a key slice on a slice the reviewer rejected is not used."""
    shape = (12, 10, 12)
    keys_along = np.zeros((shape[axis], 10, 12) if axis == 0 else (shape[axis], 12, 10), np.uint8)
    keys_along[2, 1:4, 1:4] = 1  # workspace value 1 -> segment value 2
    keys_along[4, 1:4, 1:4] = 1  # a reviewer's slice: theirs wins
    keys_along[6, 5:7, 5:7] = 3  # a rejected slice: dropped
    keys_along[8, 5:7, 5:7] = 3  # workspace value 3 -> segment value 1
    keys_along[9, 0, 0] = 7  # a value without a segment (deleted since): dropped, and no prompt of its own
    human_along = np.zeros_like(keys_along)
    human_along[4, 6:8, 6:8] = 1  # edited slice 4: the reviewer's content
    human_along[8, 0, 0] = 2  # the segmentation's content elsewhere is not a prompt
    key_seeds = np.moveaxis(keys_along, 0, axis).copy()
    human = np.moveaxis(human_along, 0, axis).copy()
    seeds, prompts, used = key_slice_prompts(key_seeds, {1: 2, 3: 1}, human, human_slices=[4, 10], rejected=[6],
                                             axis=axis)
    out = np.moveaxis(seeds, axis, 0)
    assert used == [2, 8] and prompts == [2, 4, 8]  # slice 10 is vouched for but empty: no prompt
    assert (out[2][keys_along[2] == 1] == 2).all() and out[2].sum() == 2 * 9
    assert np.array_equal(out[4], human_along[4])
    assert not out[6].any() and not out[9].any()
    assert (out[8][keys_along[8] == 3] == 1).all() and out[8][0, 0] == 0
    assert sorted(np.flatnonzero(out.any(axis=(1, 2)))) == prompts
    with pytest.raises(ValueError, match="voxels"):
        key_slice_prompts(key_seeds[:-1], {1: 2}, human, [], [], axis)


def test_the_engines_key_slices_come_back_on_the_volumes_grid(tmp_path):
    """`keyslices` (the command the module runs) on a prediction with a confidence table; its seed file, read as
    the module reads it, is a (k, j, i) array on the prediction's grid."""
    from sslmedsam2.labelmap.confidence import SliceConfidence, write_confidence

    shape = (16, 20, 18)
    labels = np.zeros(shape, np.uint8)
    labels[3:13, 5:12, 4:11] = 2
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((0.9, 0.8, 2.0))
    prediction = tmp_path / "prediction.nrrd"
    sitk.WriteImage(image, str(prediction))
    rows = [SliceConfidence(z, 2, "nnunet", bool(labels[z].any()), int(labels[z].sum()), certainty=0.5 + 0.03 * z,
                            confidence=0.5) for z in range(shape[0])]
    write_confidence(rows, tmp_path / "prediction.confidence.csv")
    seeds_path = tmp_path / "keyslices.nrrd"
    assert main(keyslices_command(str(prediction), str(seeds_path), str(tmp_path / "prediction.confidence.csv"),
                                  "axial")) == 0
    keys = read_label_array(seeds_path, shape)
    chosen = slices_with_labels(keys, 0)
    assert len(chosen) == 3 and all(4 <= z <= 11 for z in chosen)  # continuous slices, one per third
    assert max(chosen) == 11  # the last third's most certain continuous slice
    assert set(np.unique(keys)) == {0, 2} and np.array_equal(keys[chosen[0]], labels[chosen[0]])
    with pytest.raises(ValueError, match="voxels"):
        read_label_array(seeds_path, (16, 20, 17))


def test_add_to_study_asks_before_replacing_a_case_and_does_nothing_on_no(monkeypatch):
    pytest.importorskip("PySide6")
    from types import SimpleNamespace

    from test_slicer_fakes import install_fakes, slicer_fake

    slicer = slicer_fake()
    answers: list[bool] = [False, True]
    slicer.util.confirmYesNoDisplay = lambda text, **kw: slicer.calls.append(("ask", text)) or answers.pop(0)
    install_fakes(monkeypatch, slicer)
    from SSLMedSAM2Lib.study_io import AlreadyInStudy
    from SSLMedSAM2Lib.study_panel import StudyPanel

    added: list[bool] = []

    def add_to_study(workspace, volume, segmentation, axis, replace=False):
        added.append(replace)
        if not replace:
            raise AlreadyInStudy("case_7")
        return "case_7"

    button = SimpleNamespace(connect=lambda *args: True)
    status = SimpleNamespace(text="", setText=lambda text: setattr(status, "text", text))
    ui = SimpleNamespace(addToStudyButton=button, refineButton=button, cancelRefineButton=button,
                         loadRefinedButton=button, predictButton=button, refineFromKeySlicesButton=button,
                         refineStatusLabel=status)
    parameters = SimpleNamespace(workspace="/data/study", inputVolume="volume", segmentation="segmentation",
                                 axis="axial")
    install = SimpleNamespace(guarded=lambda message, work, show_error, needs: work())
    panel = SimpleNamespace(ui=ui, logic=SimpleNamespace(add_to_study=add_to_study), parameters=parameters,
                            install=install)
    study = StudyPanel(panel)
    study.onAddToStudy()  # the reviewer says no: nothing replaced
    assert added == [False] and status.text == ""
    assert slicer.calls[-1][0] == "ask" and "already case case_7 of the study" in slicer.calls[-1][1]
    study.onAddToStudy()  # yes
    assert added == [False, False, True] and status.text == "replaced the pseudo-label of case case_7 in /data/study"
