"""What every command shares: its one-line messages, its progress bar, and the options made from the one settings
object (models, image size, device, axis, intensity) and from the file rules (--overwrite, uneven DICOM)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec
from sslmedsam2.models.registry import DEFAULT_MODEL, MAX_IMAGE_SIZE
from sslmedsam2.settings import AXES, DEVICES, METHODS, MODALITIES, WINDOWS, EngineSettings


def say(message: str) -> None:
    print(f"sslmedsam2: {message}", file=sys.stderr, flush=True)


class ProgressBar:
    """A tqdm bar that appears only once work with a known size starts (nothing for a 1-second interpolation)."""

    def __init__(self, desc: str, unit: str = "slice") -> None:
        self.desc, self.unit = desc, unit
        self.bar = None

    def reset(self, total: int | None = None) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(desc=self.desc, unit=self.unit, total=total, file=sys.stderr, dynamic_ncols=True)
        else:
            self.bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def add_model_options(parser: argparse.ArgumentParser, default_model: str | None = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", default=default_model, help=f"SAM2 weights by name (default {DEFAULT_MODEL}; "
                        "see `sslmedsam2 models`)")
    parser.add_argument("--checkpoint", type=Path, help="a local checkpoint file instead of the cached download")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="auto: cuda, then mps, then cpu (bf16 autocast on cuda)")
    parser.add_argument("--image-size", type=int, help=f"SAM2 input size (a multiple of 16 from 64 to "
                        f"{MAX_IMAGE_SIZE}); smaller is faster, coarser (default: the model's own, 1024 or 512)")
    parser.add_argument("--no-download", action="store_true", help="never download weights")
    parser.add_argument("--compile", action="store_true", help="compile SAM2's tracking step (torch.compile; CUDA "
                        "graphs on a GPU, where a step is bound by its latency): tens of seconds once per shape, then "
                        "cached on disk; for a GPU and long volumes or a long-lived server, not for a CPU")


def add_frame_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--axis", default="axial", choices=AXES,
                        help="slicing plane, found from the image's direction cosines (default axial)")
    parser.add_argument("--modality", default="mri", choices=MODALITIES,
                        help="mri: clip to the 0.5/99.5 percentiles of non-zero voxels; ct: a window")
    parser.add_argument("--window", default="soft-tissue", choices=WINDOWS, help="CT window (default soft-tissue)")
    parser.add_argument("--intensity-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                        help="explicit intensity range, overriding --modality")


def add_method_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="auto", choices=METHODS, help="sam2, interpolate (no weights needed) or "
                        "auto (default: sam2 when weights can be had, else interpolate, saying so)")


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files that sslmedsam2 did "
                        "not write (without it they are refused; its own earlier outputs are always replaced)")


def add_shard_option(parser: argparse.ArgumentParser, cases: str = "case", condition: str = "") -> None:
    """--shard I/N: which of the sorted `cases` this process takes (shards.parse_shard reads it)."""
    parser.add_argument("--shard", metavar="I/N", help=f"{condition}this job takes every N-th {cases} (sorted by "
                        "name) from the I-th (1-based); default: from the scheduler's array variables (SLURM, LSF, "
                        f"SGE, PBS: see docs/cluster.md), else every {cases}")


def add_uneven_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-uneven-slices", action="store_true", help="read a DICOM series whose slices are "
                        "unevenly spaced or have gaps (missing slices) with an even spacing, saying so; without it "
                        "such a series is refused with the slice positions that are wrong")


def intensity_from(args: argparse.Namespace) -> IntensitySpec:
    return IntensitySpec(modality=args.modality, window=args.window,
                         value_range=tuple(args.intensity_range) if args.intensity_range else None)


def settings_from(args: argparse.Namespace, method: str = "sam2") -> EngineSettings:
    """The settings a command's options give (the options a command lacks keep their defaults)."""
    has_frames = hasattr(args, "modality")
    return EngineSettings(method=getattr(args, "method", method), model=args.model, checkpoint=args.checkpoint,
                          image_size=args.image_size, device=args.device,
                          axis=getattr(args, "axis", "axial"),
                          intensity=intensity_from(args) if has_frames else IntensitySpec(),
                          download=not args.no_download, compile=args.compile)


def slice_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--seed-slices {text!r}: a comma-separated list of slice numbers") from None
