"""A workspace round -> an nnU-Net v2 raw dataset (imagesTr, labelsTr, dataset.json with an ignore label)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.atomic import write_text
from sslmedsam2.study.review import IGNORE_POLICIES, SliceState
from sslmedsam2.study.workspace import Workspace
from sslmedsam2.volume import read_label_map, slice_axis, write_image


def ignore_value(ws: Workspace) -> int:
    """nnU-Net wants the ignore label to be the highest value."""
    return max(ws.labels.values()) + 1


def dataset_json(ws: Workspace, count: int, with_ignore: bool) -> dict:
    labels = {"background": 0, **dict(sorted(ws.labels.items(), key=lambda kv: kv[1]))}
    if with_ignore:
        labels["ignore"] = ignore_value(ws)
    return {"channel_names": {"0": ws.channel}, "labels": labels, "numTraining": count, "file_ending": ".nii.gz",
            "name": "SSLMedSAM2", "description": "exported by sslmedsam2 refine"}


def training_label(ws: Workspace, case_id: str, pseudo: Path, policy: str) -> sitk.Image:
    """The case's pseudo-label with the slices the policy distrusts set to the ignore label."""
    image = read_label_map(pseudo)
    states = ws.review(case_id)
    ignored = IGNORE_POLICIES[policy]
    if not states or not ignored:
        return image
    array = sitk.GetArrayFromImage(image)
    axis = slice_axis(image, ws.axis)
    marked = np.array([SliceState(s) in ignored for s in states])
    moved = np.moveaxis(array, axis, 0)
    moved[marked[: moved.shape[0]]] = ignore_value(ws)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def export_round(ws: Workspace, raw_folder: Path, pseudo_of: dict[str, Path], policy: str) -> int:
    """Ground truth as is, pseudo-labels with the ignore policy applied; returns the number of training cases."""
    (raw_folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw_folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    count, any_ignore = 0, False
    for case in sorted(ws.cases.values(), key=lambda c: c.id):
        if case.has_label:
            label = read_label_map(ws.file(case.id, "label"))
        elif case.id in pseudo_of:
            label = training_label(ws, case.id, pseudo_of[case.id], policy)
            any_ignore |= bool((sitk.GetArrayViewFromImage(label) == ignore_value(ws)).any())
        else:
            continue
        image_target = raw_folder / "imagesTr" / f"{case.id}_0000.nii.gz"
        if not image_target.exists():
            write_image(sitk.ReadImage(str(ws.file(case.id, "image"))), image_target)
        write_image(label, raw_folder / "labelsTr" / f"{case.id}.nii.gz")
        count += 1
    write_text(raw_folder / "dataset.json", json.dumps(dataset_json(ws, count, any_ignore), indent=2))
    return count
