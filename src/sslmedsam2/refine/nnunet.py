"""nnU-Net v2 through its Python API: planning, preprocessing, training with progress events, prediction.

The command-line trainer lookup imports modules that need torchvision, so the trainer is built directly.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

DATASET_BASE_ID = 500  # round r is nnU-Net dataset 500 + r, inside the workspace's own nnU-Net folders
TRAINER = "nnUNetTrainer"
PLANS = "nnUNetPlans"


class Cancelled(Exception):
    """Raised at a safe point after a stop request or SIGTERM: everything finished so far is kept for a resume."""


def use_folders(root: Path, create: bool = True) -> dict[str, Path]:
    """Point nnU-Net at the workspace's folders (its paths are read from the environment when used).
    `create=False` for readers (predict), which must not write into a workspace."""
    folders = {name: root / name for name in ("raw", "preprocessed", "results")}
    for path in folders.values():
        if create:
            path.mkdir(parents=True, exist_ok=True)
    os.environ.update(nnUNet_raw=str(folders["raw"]), nnUNet_preprocessed=str(folders["preprocessed"]),
                      nnUNet_results=str(folders["results"]))
    os.environ.setdefault("nnUNet_compile", "f")  # torch.compile costs minutes up front and is fragile on CPU
    return folders


def dataset_name(round_: int) -> str:
    return f"Dataset{DATASET_BASE_ID + round_:03d}_SSLMedSAM2r{round_:02d}"


def plan_and_preprocess(round_: int, configuration: str, reuse_plans_of: int | None = None) -> None:
    """Round 0 fingerprints and plans; later rounds reuse its plans (same images, same network) and only preprocess."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    from nnunetv2.paths import nnUNet_preprocessed

    dataset_id = DATASET_BASE_ID + round_
    os.environ["nnUNet_n_proc_DA"] = "1"  # planning calls torch.set_num_threads with it
    if reuse_plans_of is None:
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, show_progress_bar=False)
        plan_experiments([dataset_id])
    else:
        source, target = Path(nnUNet_preprocessed) / dataset_name(reuse_plans_of), Path(nnUNet_preprocessed) / dataset_name(round_)
        target.mkdir(parents=True, exist_ok=True)
        plans = json.loads((source / f"{PLANS}.json").read_text())
        plans["dataset_name"] = dataset_name(round_)
        (target / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
        shutil.copyfile(source / "dataset_fingerprint.json", target / "dataset_fingerprint.json")
        shutil.copyfile(Path(os.environ["nnUNet_raw"]) / dataset_name(round_) / "dataset.json", target / "dataset.json")
    preprocess([dataset_id], PLANS, configurations=(configuration,), num_processes=(1,), show_progress_bar=False)


def model_folder(round_: int, configuration: str) -> Path:
    from nnunetv2.paths import nnUNet_results

    return Path(nnUNet_results) / dataset_name(round_) / f"{TRAINER}__{PLANS}__{configuration}"


def train(round_: int, configuration: str, fold: str, device, epochs: int, iterations: int, val_iterations: int,
          on_epoch: Callable[[dict], None], should_stop: Callable[[], bool], warm_start_from: Path | None = None) -> Path:
    """Train (or continue an interrupted training from nnU-Net's own latest checkpoint); returns the final checkpoint."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class ReportingTrainer(nnUNetTrainer):
        """nnU-Net's own trainer, reporting each epoch and stopping cleanly when asked."""

        def on_epoch_end(self) -> None:
            super().on_epoch_end()  # logs the epoch's end, saves checkpoint_latest (save_every = 1), counts the epoch
            log = self.logger.get_value
            seconds = float(log("epoch_end_timestamps", step=-1) - log("epoch_start_timestamps", step=-1))
            on_epoch({"epoch": self.current_epoch, "epochs": self.num_epochs,
                      "loss": float(log("train_losses", step=-1)), "val_loss": float(log("val_losses", step=-1)),
                      "pseudo_dice": [float(v) for v in log("dice_per_class_or_region", step=-1)],
                      "eta_s": round(seconds * (self.num_epochs - self.current_epoch), 1)})
            if should_stop() and self.current_epoch < self.num_epochs:
                raise Cancelled()  # the checkpoint of this epoch is already saved

    ReportingTrainer.__name__ = ReportingTrainer.__qualname__ = TRAINER  # nnU-Net's standard folder and name

    if str(device) == "cpu":
        os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: no worker processes to orphan
    else:
        os.environ.pop("nnUNet_n_proc_DA", None)  # nnU-Net's own choice of augmentation workers
    preprocessed = Path(nnUNet_preprocessed) / dataset_name(round_)
    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    output = model_folder(round_, configuration) / f"fold_{fold}"
    latest, final = output / "checkpoint_latest.pth", output / "checkpoint_final.pth"
    if final.is_file():
        return final
    plans["continue_training"] = latest.is_file()
    trainer = ReportingTrainer(plans, configuration, fold if fold == "all" else int(fold),
                               json.loads((preprocessed / "dataset.json").read_text()), torch.device(device))
    trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iterations
    trainer.num_val_iterations_per_epoch, trainer.save_every = val_iterations, 1
    if latest.is_file():
        trainer.load_checkpoint(str(latest))
    elif warm_start_from is not None:
        trainer.initialize()
        weights = torch.load(warm_start_from, map_location=trainer.device, weights_only=False)["network_weights"]
        trainer.network.load_state_dict(weights)
    trainer.run_training()
    return final


def load_predictor(round_: int, configuration: str, fold: str, device, progress: bool = False):
    """nnU-Net's predictor with the round's trained weights (sliding-window progress bars on stderr if asked)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device(device), allow_tqdm=progress,
                                perform_everything_on_device=str(device) != "cpu")
    predictor.initialize_from_trained_model_folder(str(model_folder(round_, configuration)),
                                                   use_folds=(fold if fold == "all" else int(fold),))
    return predictor


def predict_probabilities(predictor, image: Path):
    """(label map, {label value: softmax channel}) of one image, both in SimpleITK's array order (z, y, x) on the
    image's own grid, from nnU-Net's sequential path (no worker pool, nothing written)."""
    import numpy as np

    [(segmentation, probabilities)] = predictor.predict_from_files_sequential([[str(image)]], None, True, True, None)
    channels = predictor.label_manager.all_labels  # softmax channel i is label all_labels[i]
    return (np.asarray(segmentation),
            {int(v): np.asarray(probabilities[i], dtype=np.float32) for i, v in enumerate(channels) if v != 0})


def predict(round_: int, configuration: str, fold: str, device, images: list[Path], outputs: list[Path],
            should_stop: Callable[[], bool] = lambda: False, confidence_axis: str | None = None) -> None:
    """Predict one image at a time (nnU-Net's sequential path: no worker pool), skipping finished outputs.

    confidence_axis: also write each output's `.confidence.csv` from nnU-Net's softmax along this slice axis
    (before the label map, which appears last; an output without its table is predicted again)."""
    from sslmedsam2.propagation.confidence import confidence_path

    todo = [(i, o) for i, o in zip(images, outputs)
            if not o.exists() or (confidence_axis is not None and not confidence_path(o).exists())]
    if not todo:
        return
    predictor = load_predictor(round_, configuration, fold, device)
    for image, output in todo:
        if should_stop():
            raise Cancelled()
        output.parent.mkdir(parents=True, exist_ok=True)
        if confidence_axis is not None:
            write_with_confidence(predictor, image, output, confidence_axis)
            continue
        truncated = output.parent / f".{output.name[: -len('.nii.gz')]}.tmp{int(time.time() * 1e6)}"
        predictor.predict_from_files_sequential([[str(image)]], [str(truncated)], False, True, None)
        os.replace(f"{truncated}.nii.gz", output)


def write_with_confidence(predictor, image: Path, output: Path, axis: str, reference=None) -> None:
    """Predict `image`; write its confidence table (slices along `axis`), then the label map `output` (atomic,
    verified, on the grid of `reference`, default: the image file's)."""
    import numpy as np
    import SimpleITK as sitk

    from sslmedsam2.propagation.confidence import confidence_path, write_confidence
    from sslmedsam2.refine.softmax import softmax_confidence
    from sslmedsam2.volume import slice_axis
    from sslmedsam2.volume.io import staged_image

    segmentation, probabilities = predict_probabilities(predictor, image)
    reference = sitk.ReadImage(str(image)) if reference is None else reference
    labels = sitk.GetImageFromArray(segmentation.astype(np.uint8 if segmentation.max() < 256 else np.uint16))
    labels.CopyInformation(reference)
    array_axis = slice_axis(reference, axis)
    rows = softmax_confidence(np.moveaxis(segmentation, array_axis, 0),
                              {k: np.moveaxis(v, array_axis, 0) for k, v in probabilities.items()})
    with staged_image(labels, output):  # the label map appears last
        write_confidence(rows, confidence_path(output))
