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


def test_evaluate_folders_by_name_with_csv(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir(), gt.mkdir()
    truth = np.zeros((6, 8, 8), np.uint8)
    truth[1:5, 2:6, 2:6] = 1
    truth[2:4, 6:8, 0:2] = 2
    for name in ("a.nii.gz", "b.nii.gz"):
        _write(gt / name, truth)
        _write(pred / name, truth if name == "a.nii.gz" else (truth == 1))
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
