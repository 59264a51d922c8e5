"""The module's settings and the engine command lines they turn into: checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODELS = ("medsam2", "sam2.1-tiny", "sam2.1-small", "sam2.1-base-plus", "sam2.1-large")
DEVICES = ("auto", "cuda", "mps", "cpu")
AXES = ("axial", "coronal", "sagittal")


@dataclass
class EngineSettings:
    model: str = "medsam2"
    checkpoint: str = ""  # a local file instead of the cached download
    image_size: int = 0  # 0: the model's own
    device: str = "auto"
    axis: str = "axial"
    modality: str = "mri"
    allow_download: bool = False  # set once the user agreed to download weights


def problems(settings: EngineSettings) -> list[str]:
    """Everything wrong with the settings, as sentences for the GUI (empty: good to go)."""
    found = []
    if settings.model not in MODELS:
        found.append(f"Unknown model {settings.model!r}.")
    if settings.device not in DEVICES:
        found.append(f"Unknown device {settings.device!r}.")
    if settings.axis not in AXES:
        found.append(f"Unknown slice axis {settings.axis!r}.")
    if settings.modality not in ("mri", "ct"):
        found.append(f"Unknown modality {settings.modality!r}.")
    if settings.image_size and (settings.image_size % 16 or settings.image_size < 64):
        found.append(f"Image size {settings.image_size} must be a multiple of 16, at least 64 (0: the model's own).")
    if settings.checkpoint and not Path(settings.checkpoint).is_file():
        found.append(f"Checkpoint {settings.checkpoint} does not exist.")
    return found


def _model_args(settings: EngineSettings) -> list[str]:
    args = ["--model", settings.model, "--device", settings.device]
    if settings.checkpoint:
        args += ["--checkpoint", settings.checkpoint]
    if settings.image_size:
        args += ["--image-size", str(settings.image_size)]
    if not settings.allow_download:
        args.append("--no-download")
    return args


def propagate_command(settings: EngineSettings, image: str, seeds: str, output: str) -> list[str]:
    return ["propagate", image, seeds, "-o", output, "--method", "sam2", "--axis", settings.axis,
            "--modality", settings.modality, *_model_args(settings)]


def pseudolabel_command(settings: EngineSettings, support_images: str, support_labels: str, query: str,
                        output: str, insertions: int = 5, supports: int = 0) -> list[str]:
    args = ["pseudolabel", "--support-images", support_images, "--support-labels", support_labels, "--query", query,
            "-o", output, "--insertions", str(insertions), "--axis", settings.axis, "--modality", settings.modality,
            *_model_args(settings)]
    return args + (["--supports", str(supports)] if supports else [])


def refine_command(workspace: str, rounds: int = 5, quick: bool = False, warm_start: bool = False,
                   device: str = "auto", ignore: str = "rejected") -> list[str]:
    args = ["refine", workspace, "--rounds", str(rounds), "--device", device, "--ignore", ignore]
    return args + (["--quick"] if quick else []) + (["--warm-start"] if warm_start else [])
