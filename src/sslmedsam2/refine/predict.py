"""`sslmedsam2 predict WS IMAGE -o OUTPUT`: a new image segmented by the workspace's latest refined nnU-Net.

Reads the workspace, writes nothing into it (it may be read-only or shared); nnU-Net's input goes to a temporary
folder, the label map to OUTPUT (atomically, last) and the per-slice confidence from nnU-Net's softmax to OUTPUT's
name + .confidence.csv, so a prediction is reviewed in the same order as a propagation. The model's checkpoint,
plans.json and dataset.json are used only as refine recorded them (sslmedsam2.refine.checkpoints): a planted or
altered file is refused in one line.
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


def predict_image(ws: Workspace, image_path: Path, output: Path, device: str = "auto",
                  progress: bool = False, overwrite: bool = False, allow_uneven: bool = False) -> TrainedModel:
    """Segment `image_path` onto its own grid and write OUTPUT's `.confidence.csv` beside it (per slice along the
    workspace's axis and label, from nnU-Net's softmax: the table `propagate` writes, source `nnunet`); returns
    the model used. The label map appears last."""
    from sslmedsam2.labelmap.confidence import confidence_path
    from sslmedsam2.refine import nnunet
    from sslmedsam2.volume import read_image, write_image
    from sslmedsam2.volume.io import check_geometry_fits, check_output, check_table_output

    output = Path(output)
    check_output(output, (Path(image_path),), overwrite)
    check_table_output(confidence_path(output), (Path(image_path),), overwrite)
    model = latest_model(ws)
    from sslmedsam2.propagation.device import resolve_device  # torch: only once there is a model to run

    image = read_image(image_path, allow_uneven)
    check_geometry_fits(image, output, what=str(image_path))
    check_geometry_fits(image, Path("image.nii.gz"), what=str(image_path))  # nnU-Net reads it as NIfTI
    with tempfile.TemporaryDirectory(prefix="sslmedsam2-predict-") as tmp:
        source = Path(tmp) / "case_0000.nii.gz"
        write_image(image, source)
        with open(Path(tmp) / "nnunet.log", "w") as log, contextlib.redirect_stdout(log):
            predictor = nnunet.load_predictor(model.round, model.configuration, model.fold,
                                              str(resolve_device(device)), progress=progress)
            nnunet.write_with_confidence(predictor, source, output, ws.axis, reference=image)
    return model
