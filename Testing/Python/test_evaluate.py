"""Dice, HD95 and ASSD in millimetres; files and folders; the CSV."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import table_lines, to_image

from sslmedsam2.cli import main
from sslmedsam2.metrics import score_labels


def test_shifted_box_scores_in_millimetres():
    truth = np.zeros((10, 10, 10), np.uint8)
    truth[2:6, 2:6, 2:6] = 1
    pred = np.roll(truth, 1, axis=0)  # one slice further along z
    (score,) = score_labels(pred, truth, (3.0, 1.0, 1.0))
    assert score.dice == pytest.approx(2 * 48 / 128)
    assert score.hd95 == pytest.approx(3.0)  # one slice of 3 mm
    assert 0 < score.assd < 3.0


def test_identical_and_empty_cases():
    a = np.zeros((5, 5, 5), np.uint8)
    a[1:4, 1:4, 1:4] = 2
    (same,) = score_labels(a, a, (1, 1, 1))
    assert (same.dice, same.hd95, same.assd) == (1.0, 0.0, 0.0)
    (missing,) = score_labels(np.zeros_like(a), a, (1, 1, 1))
    assert missing.dice == 0.0 and math.isnan(missing.hd95)
    (both_empty,) = score_labels(np.zeros_like(a), np.zeros_like(a), (1, 1, 1), labels=[1])
    assert both_empty.dice == 1.0


def _write(path, array):
    sitk.WriteImage(to_image(array.astype(np.uint8)), str(path))


def _two_cases(tmp_path):
    """pred/ and gt/ with a.nii.gz (exact) and b.nii.gz (label 2 missed); returns them and the truth."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[1:5, 2:6, 2:6] = 1
    truth[2:4, 6:8, 0:2] = 2
    for name in ("a.nii.gz", "b.nii.gz"):
        _write(gt / name, truth)
        _write(pred / name, truth if name == "a.nii.gz" else (truth == 1))
    return pred, gt, truth


def test_evaluate_folders_by_name_with_csv(tmp_path, capsys):
    pred, gt, truth = _two_cases(tmp_path)
    _write(gt / "only_gt.nii.gz", truth)
    table = tmp_path / "scores.csv"
    assert main(["evaluate", str(pred), str(gt), "--csv", str(table)]) == 0
    captured = capsys.readouterr()
    assert "only_gt.nii.gz" in captured.err and "dice" in captured.out
    rows = list(csv.DictReader(table_lines(table)))
    assert {"label", "dice", "hd95", "assd"} <= set(rows[0])
    assert [(r["case"], r["label"]) for r in rows] == [("a.nii.gz", "1"), ("a.nii.gz", "2"), ("b.nii.gz", "1"), ("b.nii.gz", "2")]
    assert float(rows[0]["dice"]) == 1.0 and float(rows[3]["dice"]) == 0.0 and rows[3]["hd95"] == "nan"


def test_evaluate_two_files(tmp_path, capsys):
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[1:5, 2:6, 2:6] = 1
    _write(tmp_path / "p.nii.gz", truth)
    _write(tmp_path / "g.nii.gz", truth)
    assert main(["evaluate", str(tmp_path / "p.nii.gz"), str(tmp_path / "g.nii.gz")]) == 0
    assert "1.0000" in capsys.readouterr().out


# --- evaluate ----------------------------------------------------------------------------------------------------
def test_evaluate_names_labels_and_adds_mean_rows(tmp_path, capsys):
    pred, gt, truth = _two_cases(tmp_path)
    table = tmp_path / "scores.csv"
    assert main(["evaluate", str(pred), str(gt), "--labels", "liver=1,spleen=2", "--csv", str(table)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("a.nii.gz") and "liver (1)" in line for line in out), out
    means = [line.split() for line in out if line.startswith("mean")]
    assert means[0][:6] == ["mean", "of", "2", "cases", "liver", "(1)"] and means[0][6] == "1.0000"
    assert means[1][4:7] == ["spleen", "(2)", "0.5000"]
    assert means[2][4:7] == ["all", "labels", "0.7500"]
    rows = list(csv.DictReader(table_lines(table)))
    assert [(r["label"], r["name"]) for r in rows[:2]] == [("1", "liver"), ("2", "spleen")]
    # the names of the workspace the files lie in
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws), "--label", "head=1", "--label", "tail=2"]) == 0
    inside = ws / "elsewhere"
    inside.mkdir()
    sitk.WriteImage(to_image(truth), str(inside / "p.nii.gz"))
    capsys.readouterr()
    assert main(["evaluate", str(inside / "p.nii.gz"), str(gt / "a.nii.gz")]) == 0
    out = capsys.readouterr().out
    assert "head (1)" in out and "tail (2)" in out and out.splitlines()[-1].split()[:3] == ["mean", "all", "labels"]
