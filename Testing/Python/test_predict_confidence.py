"""`predict` writes the confidence table of `propagate` from nnU-Net's softmax; one certainty rule for every source."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import synthetic_case, table_lines, to_image
from scipy import ndimage

from sslmedsam2.cli import main
from sslmedsam2.labelmap.confidence import COLUMNS, confidence_path, read_confidence, slice_certainty
from sslmedsam2.refine.softmax import softmax_confidence


def test_rows_from_softmax():
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[0, 2:5, 2:5] = 1
    labels[1, 4:7, 4:7] = 2
    p1 = np.where(labels == 1, 0.9, 0.02).astype(np.float32)
    p1[2, 0, 0] = 0.3  # label 1 absent from slice 2, but not impossible there
    p2 = np.where(labels == 2, 0.7, 0.01).astype(np.float32)
    rows = {(r.slice, r.label): r for r in softmax_confidence(labels, {1: p1, 2: p2})}
    assert len(rows) == 6 and {r.source for r in rows.values()} == {"nnunet"}
    r = rows[0, 1]
    assert r.present and r.voxels == 9 and r.presence == pytest.approx(0.9)
    assert r.certainty == pytest.approx(0.8) and math.isnan(r.agreement)  # |2 x 0.9 - 1| over the 9 voxels
    assert r.confidence == pytest.approx(0.9 * 0.8)
    r = rows[2, 1]
    assert not r.present and r.voxels == 0 and r.presence == pytest.approx(0.3)
    assert r.certainty == pytest.approx(0.4) and r.confidence == pytest.approx(0.7 * 0.4)
    r = rows[0, 2]
    assert not r.present and r.certainty == 1.0 and r.confidence == pytest.approx(0.99)  # nothing above 0.05
    assert rows[1, 2].certainty == pytest.approx(0.4) and rows[1, 2].presence == pytest.approx(0.7)


def test_one_certainty_rule_for_sam2_and_nnunet():
    torch = pytest.importorskip("torch")
    from sslmedsam2.propagation.sam2_propagation import slice_certainty as on_tensors

    prob = torch.rand(3, 32, 32)
    prob[1] = 0.01
    expected = np.array([((2 * p - 1).abs()[p > 0.05].mean().item() if (p > 0.05).any() else 1.0) for p in prob])
    assert np.allclose(on_tensors(prob).numpy(), expected, atol=1e-6)
    assert np.allclose(slice_certainty(prob.numpy()), expected, atol=1e-6)
    assert on_tensors(prob).dtype == torch.float32


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A coronal workspace (2 cases with ground truth, 1 with a pseudo-label) after one --quick round."""
    root = tmp_path_factory.mktemp("predict")
    ws = root / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2", "--axis", "coronal"]) == 0
    for i in range(3):
        image, labels = synthetic_case((12, 40, 40), seed=i)
        sitk.WriteImage(to_image(image), str(root / f"c{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(root / f"c{i}_gt.nii.gz"))
        if i < 2:
            assert main(["workspace", "add", str(ws), "--image", str(root / f"c{i}.nii.gz"),
                         "--label", str(root / f"c{i}_gt.nii.gz")]) == 0
        else:
            rough = labels.copy()
            rough[~ndimage.binary_erosion(labels > 0)] = 0
            sitk.WriteImage(to_image(rough), str(root / f"c{i}_pseudo.nii.gz"))
            assert main(["workspace", "add", str(ws), "--image", str(root / f"c{i}.nii.gz"),
                         "--pseudo", str(root / f"c{i}_pseudo.nii.gz")]) == 0
    assert main(["refine", str(ws), "--quick", "--device", "cpu", "--rounds", "1", "--configuration", "2d"]) == 0
    return ws


def test_predict_writes_the_confidence_table_along_the_workspace_axis(trained, tmp_path, capsys):
    image_path = trained.parent / "c2.nii.gz"
    out = tmp_path / "new case.nrrd"
    capsys.readouterr()
    assert main(["predict", str(trained), str(image_path), "-o", str(out), "--device", "cpu"]) == 0
    assert "new case.confidence.csv" in capsys.readouterr().err
    table = confidence_path(out)
    assert table == tmp_path / "new case.confidence.csv"
    assert table_lines(table)[0].split(",") == COLUMNS
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    rows = read_confidence(table)
    coronal = labels.shape[1]  # identity direction: numpy axis 1 runs across coronal slices
    assert sorted((r.slice, r.label) for r in rows) == [(z, label) for z in range(coronal) for label in (1, 2)]
    for r in rows:
        assert r.source == "nnunet" and math.isnan(r.agreement)
        assert r.voxels == int((labels[:, r.slice, :] == r.label).sum()) and r.present == (r.voxels > 0)
        assert 0 <= r.presence <= 1 and 0 <= r.certainty <= 1 and 0 <= r.confidence <= 1
        if r.present:
            assert r.presence >= 1 / 3  # the winning class of a 3-way softmax somewhere on the slice


def test_predict_refuses_before_any_work(trained, tmp_path, capsys):
    image_path = trained.parent / "c2.nii.gz"
    assert main(["predict", str(trained), str(image_path), "-o", str(image_path)]) == 1
    assert "is the input" in capsys.readouterr().err
    assert main(["predict", str(trained), str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "x.nii.gz")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_predict_into_a_dicom_series_draws_its_picture_beside_it(trained, tmp_path):
    from conftest import coloured_pixels

    from sslmedsam2.volume import read_label_map

    out = tmp_path / "series"  # a folder name without suffix: a DICOM series
    assert main(["predict", str(trained), str(trained.parent / "c2.nii.gz"), "-o", str(out), "--device", "cpu"]) == 0
    assert out.is_dir() and read_label_map(out).GetSize() == sitk.ReadImage(str(trained.parent / "c2.nii.gz")).GetSize()
    assert coloured_pixels(tmp_path / "series.overview.png") > 0
