"""`refine --sam2-from-nnunet`: nnU-Net's key slices prompt a random-weight SAM2, whose result is the next
pseudo-label; fusion, vouched-for slices, events, stop and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SIZE, synthetic_case, to_image
from scipy import ndimage

from sslmedsam2.session.local import LocalSession
from sslmedsam2.settings import EngineSettings
from sslmedsam2.cli import main
from sslmedsam2.labelmap.confidence import confidence_path, read_confidence, write_confidence
from sslmedsam2.refine.events import read_events, request_stop
from sslmedsam2.refine.sam2_refine import Sam2Settings, refine_case
from sslmedsam2.refine.softmax import softmax_confidence
from sslmedsam2.study.review import SliceState
from sslmedsam2.study.workspace import Workspace, add_case, init_workspace

SHAPE = (12, 40, 40)


def _sam2_args(checkpoint: Path) -> list[str]:
    return ["--sam2-from-nnunet", "--model", "sam2.1-tiny", "--checkpoint", str(checkpoint),
            "--image-size", str(TINY_SIZE)]


@pytest.fixture
def study(tmp_path) -> Path:
    """2 cases with ground truth, 2 with rough pseudo-labels; slices 3 and 8 of c2 vouched for (accepted)."""
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    for i in range(4):
        image, labels = synthetic_case(SHAPE, seed=i)
        sitk.WriteImage(to_image(image), str(tmp_path / f"c{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(tmp_path / f"c{i}_gt.nii.gz"))
        if i < 2:
            extra = ["--label", str(tmp_path / f"c{i}_gt.nii.gz")]
        else:
            rough = labels.copy()
            rough[~ndimage.binary_erosion(labels > 0)] = 0
            sitk.WriteImage(to_image(rough), str(tmp_path / f"c{i}_pseudo.nii.gz"))
            extra = ["--pseudo", str(tmp_path / f"c{i}_pseudo.nii.gz"), "--eval-label", str(tmp_path / f"c{i}_gt.nii.gz")]
        assert main(["workspace", "add", str(ws), "--image", str(tmp_path / f"c{i}.nii.gz"), *extra]) == 0
    assert main(["workspace", "review", str(ws), "c2", "--slices", "3,8", "--state", "accepted"]) == 0
    return ws


def _events(ws: Path) -> list[dict]:
    return read_events(ws / "refine" / "events.jsonl")[0]


def test_one_round_end_to_end_with_a_stop_between_cases_and_resume(study, tiny_checkpoint, monkeypatch, capsys):
    argv = ["refine", str(study), "--quick", "--device", "cpu", "--rounds", "1", "--convergence", "1.0",
            *_sam2_args(tiny_checkpoint), "--key-slices", "2", "--min-continuity", "0.3"]
    real = LocalSession.propagate
    calls = []

    def propagate_then_stop(self, update, *args, **kwargs):  # a stop request arrives while the first case propagates
        calls.append(sorted(update))
        request_stop(study / "refine")
        return real(self, update, *args, **kwargs)

    monkeypatch.setattr(LocalSession, "propagate", propagate_then_stop)
    assert main(argv) == 3  # cancelled at the next safe point: between cases
    round_dir = study / "refine" / "rounds" / "round_00"
    sam2 = round_dir / "sam2"
    assert len(calls) == 1 and (sam2 / "c2.nii.gz").is_file() and not (sam2 / "c3.nii.gz").exists()
    assert "sam2" not in json.loads((round_dir / "steps.json").read_text())
    assert _events(study)[-1]["state"] == "cancelled"
    finished_c2 = (sam2 / "c2.nii.gz").stat().st_mtime_ns
    trained_epochs = [e["epoch"] for e in _events(study) if e["event"] == "epoch"]

    monkeypatch.setattr(LocalSession, "propagate", real)
    assert main(argv) == 0
    events = _events(study)
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == trained_epochs, "training was not redone"
    assert (sam2 / "c2.nii.gz").stat().st_mtime_ns == finished_c2, "a finished case was not redone"
    assert "sam2" in json.loads((round_dir / "steps.json").read_text())
    assert any(e["event"] == "stage" and e["stage"] == "sam2" and "case 2/2 (c3)" in e["message"] for e in events)

    # the round records which source won how many slices, per case and in all
    result = json.loads((round_dir / "round.json").read_text())
    round_event = [e for e in events if e["event"] == "round"][-1]
    assert round_event["sources"] == result["sources"] and round_event["case_sources"] == result["case_sources"]
    assert sum(result["sources"].values()) == 2 * SHAPE[0]
    assert result["case_sources"]["c2"]["human"] == 2 and result["case_sources"]["c3"]["human"] == 0
    assert result["case_sources"]["c2"]["sam2"] == SHAPE[0] - 2  # fusion sam2: SAM2 ran (the vouched-for slices prompt it)
    capsys.readouterr()
    assert main(["workspace", "status", str(study), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)["refine"]
    assert status["state"] == "finished" and status["rounds"][0]["sources"] == result["sources"]

    # nnU-Net's prediction came with its softmax table; the seeds hold the vouched-for slices exactly
    assert {r.source for r in read_confidence(confidence_path(round_dir / "predicted" / "c2.nii.gz"))} == {"nnunet"}
    pseudo = sitk.GetArrayFromImage(sitk.ReadImage(str(study / "cases" / "c2" / "pseudo.nii.gz")))
    seeds = sitk.GetArrayFromImage(sitk.ReadImage(str(sam2 / "seeds" / "c2.nii.gz")))
    record = json.loads((sam2 / "c2.json").read_text())
    assert record["human_slices"] == [3, 8]
    for z in (3, 8):
        assert np.array_equal(seeds[z], pseudo[z])
    for label, slices in record["key_slices"].items():
        for z in slices:
            if z not in (3, 8):
                assert (seeds[z] == int(label)).any()
    new = sitk.GetArrayFromImage(sitk.ReadImage(str(round_dir / "pseudo" / "c2.nii.gz")))
    assert np.array_equal(new[[3, 8]], pseudo[[3, 8]])
    assert set(np.unique(new)) <= {0, 1, 2}


def test_fusion_by_confidence_vouched_slices_and_labels_nobody_prompted(tmp_path, tiny_checkpoint):
    """No nnU-Net here: a prediction and its softmax table are given, refine_case does the rest."""
    ws = init_workspace(tmp_path / "ws", {"a": 1, "b": 2})
    image, labels = synthetic_case(SHAPE, seed=3)
    labels[labels == 2] = 0
    labels[5:7, 30:34, 30:34] = 2  # label 2 on two slices only: it cannot continue, so it gets no key slice
    sitk.WriteImage(to_image(image), str(tmp_path / "c.nii.gz"))
    sitk.WriteImage(to_image(labels), str(tmp_path / "pseudo.nii.gz"))
    add_case(ws, tmp_path / "c.nii.gz", pseudo=tmp_path / "pseudo.nii.gz", case_id="c")
    ws = Workspace.open(ws.root)
    states = ws.review("c")
    states[9] = SliceState.EDITED
    ws.set_review("c", states)
    predicted = tmp_path / "predicted" / "c.nii.gz"
    predicted.parent.mkdir()
    prediction = labels.copy()
    prediction[9] = 0  # nnU-Net misses slice 9, which a person edited
    sitk.WriteImage(to_image(prediction), str(predicted))
    probs = {v: np.where(prediction == v, 1.0, 0.0).astype(np.float32) for v in (1, 2)}  # sure of every slice
    write_confidence(softmax_confidence(prediction, probs), confidence_path(predicted))
    options = EngineSettings(method="sam2", model="sam2.1-tiny", checkpoint=tiny_checkpoint, device="cpu",
                             image_size=TINY_SIZE)

    out = tmp_path / "sam2"
    settings = Sam2Settings(options, per_label=2, min_continuity=0.5, fusion="confidence", log=lambda m: None)
    record = refine_case(ws, "c", predicted, out, settings)
    result = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "c.nii.gz")))
    assert np.array_equal(result[9], labels[9]), "the edited slice is kept as the person left it"
    seeds = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "seeds" / "c.nii.gz")))
    assert np.array_equal(seeds[9], labels[9]), "and it is a prompt"
    assert record["key_slices"]["2"] == [] and len(record["key_slices"]["1"]) == 2 and record["prompted_labels"] == [1]
    # an unprompted label keeps nnU-Net's voxels where SAM2 left background
    assert not ((result == 2) & (prediction != 2)).any() and (result[prediction == 2] > 0).all()
    # nnU-Net claims certainty 1 everywhere; SAM2 (random weights) only on its seeds (confidence 1, ties go to SAM2)
    keys = set(record["key_slices"]["1"])
    assert record["sources"] == {"sam2": len(keys - {9}), "nnunet": SHAPE[0] - 1 - len(keys - {9}), "human": 1}
    for z in set(range(SHAPE[0])) - keys - {9}:
        assert np.array_equal(result[z], prediction[z])
    rows = read_confidence(confidence_path(out / "c.nii.gz"))
    assert all(r.voxels == int((result[r.slice] == r.label).sum()) for r in rows)
    assert {r.source for r in rows if r.slice in keys - {9} and r.label == 1} == {"seed"}


def test_sam2_options_are_checked_before_any_work(study, tmp_path, capsys):
    def expect(argv, fragment):
        assert main(["refine", str(study), "--quick", "--device", "cpu", *argv]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sslmedsam2: error: ") and fragment in err[-1], err

    expect(["--model", "sam2.1-tiny"], "add it or leave them out")
    expect(["--sam2-from-nnunet", "--checkpoint", str(tmp_path / "missing.pt")], "no such file")
    expect(["--sam2-from-nnunet", "--no-download"], "downloading is off")
    expect(["--sam2-from-nnunet", "--model", "nope"], "unknown model")
    expect(["--sam2-from-nnunet", "--image-size", "100"], "multiple of 16")
    expect(["--sam2-from-nnunet", "--key-slices", "0"], "--key-slices 0")
    expect(["--sam2-from-nnunet", "--min-continuity", "2"], "--min-continuity 2")
    assert not (study / "refine").exists()
