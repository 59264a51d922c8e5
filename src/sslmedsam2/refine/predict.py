"""`sslmedsam2 predict WS IMAGE -o OUTPUT`: a new image segmented by the workspace's latest refined nnU-Net.

Reads the workspace, writes nothing into it (it may be read-only or shared); nnU-Net's output goes to a temporary
folder, the label map to OUTPUT, atomically.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sslmedsam2.errors import UserError
from sslmedsam2.study.workspace import Workspace


@dataclass
class TrainedModel:
    round: int
    configuration: str
    fold: str


def latest_model(ws: Workspace) -> TrainedModel:
    """The last finished round whose final checkpoint exists."""
    from sslmedsam2.refine import nnunet
    from sslmedsam2.refine.rounds import refine_status

    status = refine_status(ws)
    options = status.get("options") or {}
    if options:
        nnunet.use_folders(ws.refine_dir / "nnunet", create=False)
        for r in sorted((r["round"] for r in status.get("rounds", [])), reverse=True):
            folder = nnunet.model_folder(r, options["configuration"]) / f"fold_{options['fold']}"
            if (folder / "checkpoint_final.pth").is_file():
                return TrainedModel(r, options["configuration"], options["fold"])
    raise UserError(f"{ws.root}: no finished refinement round yet; run `sslmedsam2 refine {ws.root}` first")


def predict_image(ws: Workspace, image_path: Path, output: Path, device: str = "auto") -> TrainedModel:
    """Segment `image_path` onto its own grid; returns the model used."""
    from sslmedsam2.models.loader import resolve_device
    from sslmedsam2.refine import nnunet
    from sslmedsam2.volume import read_image, read_label_map, write_image
    from sslmedsam2.volume.io import check_geometry_fits, check_output

    check_output(output, (Path(image_path),))
    model = latest_model(ws)
    image = read_image(image_path)
    check_geometry_fits(image, output, what=str(image_path))
    check_geometry_fits(image, Path("image.nii.gz"), what=str(image_path))  # nnU-Net reads it as NIfTI
    with tempfile.TemporaryDirectory(prefix="sslmedsam2-predict-") as tmp:
        source, result = Path(tmp) / "case_0000.nii.gz", Path(tmp) / "case.nii.gz"
        write_image(image, source)
        with open(Path(tmp) / "nnunet.log", "w") as log, contextlib.redirect_stdout(log):
            nnunet.predict(model.round, model.configuration, model.fold, str(resolve_device(device)),
                           [source], [result])
        labels = read_label_map(result)
        labels.CopyInformation(image)
        write_image(labels, output)
    return model
