"""Rebuild the shipped demo sample from ../shared/data/hippocampus (MSD Task04, CC-BY-SA 4.0).

Seeds: every 5th coronal slice of each label's extent (its first and last slice included), from the manual label.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from sslmedsam2.labelmap.seeds import Seeds
from sslmedsam2.volume import slice_axis

CASE = "hippocampus_001"
STEP = 5


def main(shared: Path, target: Path) -> None:
    image = sitk.ReadImage(str(shared / "images" / f"{CASE}.nii.gz"))
    label = sitk.Cast(sitk.ReadImage(str(shared / "labels" / f"{CASE}.nii.gz")), sitk.sitkUInt8)
    axis = slice_axis(label, "coronal")
    full = np.moveaxis(sitk.GetArrayFromImage(label), axis, 0)
    seeds = Seeds.every_nth_slice(full, STEP).labels_map
    seeds_image = sitk.GetImageFromArray(np.moveaxis(seeds, 0, axis))
    seeds_image.CopyInformation(label)
    sitk.WriteImage(image, str(target / f"{CASE}_image.nii.gz"), useCompression=True)
    sitk.WriteImage(label, str(target / f"{CASE}_label.nii.gz"), useCompression=True)
    sitk.WriteImage(seeds_image, str(target / f"{CASE}_seeds.nii.gz"), useCompression=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("../shared/data/hippocampus"),
         Path(__file__).resolve().parents[1] / "src" / "sslmedsam2" / "sample")
