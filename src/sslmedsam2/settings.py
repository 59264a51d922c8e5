"""The one settings object of a segmentation: which method and SAM2 weights, at which image size, on which device,
slicing along which axis, with which intensity mapping. It checks itself; the command line's options, the server
and the Slicer module are all made from it (no torch, no SimpleITK here)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sslmedsam2.errors import UserError
from sslmedsam2.frames.intensity import CT_WINDOWS, IntensitySpec
from sslmedsam2.models.registry import DEFAULT_MODEL, MAX_IMAGE_SIZE, MODELS, ModelSpec, image_size_problem

METHODS = ("auto", "sam2", "interpolate")  # auto: SAM2 when weights can be had, else interpolation (said plainly)
DEVICES = ("auto", "cuda", "mps", "cpu")
AXES = ("axial", "coronal", "sagittal")
MODALITIES = ("mri", "ct")
WINDOWS = tuple(CT_WINDOWS)
MODEL_NAMES = tuple(MODELS)
MODES = ("local", "exact")  # of a propagation in a session with a result: around the corrections, or all again

__all__ = ["AXES", "DEFAULT_MODEL", "DEVICES", "EditRule", "EngineSettings", "MAX_IMAGE_SIZE", "METHODS", "MODALITIES",
           "MODEL_NAMES", "MODES", "WINDOWS", "check_mode"]


@dataclass
class EngineSettings:
    """How a volume is segmented. `model` None: whatever the engine serving it uses (a server's own model)."""

    method: str = "auto"
    model: str | None = DEFAULT_MODEL
    checkpoint: Path | None = None  # a local file instead of the cached download
    image_size: int | None = None  # None: the model's own
    device: str = "auto"  # auto: cuda, then mps, then cpu
    axis: str = "axial"
    intensity: IntensitySpec = field(default_factory=IntensitySpec)
    download: bool = True  # weights may be downloaded when they are not cached
    compile: bool = False  # SAM2's tracking step compiled (propagation/compiled.py)

    def problems(self) -> list[str]:
        """Everything wrong, one sentence each (empty: good to go)."""
        found = []
        if self.method not in METHODS:
            found.append(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.model is not None and self.model not in MODELS:
            found.append(f"unknown model {self.model!r}; known models: {', '.join(MODELS)}")
        if self.image_size is not None:
            problem = image_size_problem(self.image_size)
            if problem:
                found.append(problem)
        if self.device not in DEVICES:
            found.append(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.axis not in AXES:
            found.append(f"unknown axis {self.axis!r}; choose one of {', '.join(AXES)}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            found.append(f"checkpoint {self.checkpoint}: no such file")
        return found

    def check(self) -> "EngineSettings":
        """Raise the first problem as a UserError (the command line's one line); returns self."""
        found = self.problems()
        if found:
            raise UserError(found[0])
        return self

    @property
    def spec(self) -> ModelSpec:
        return MODELS[self.model or DEFAULT_MODEL]

    @property
    def size(self) -> int:
        """The image size SAM2 runs at: the one asked for, else the model's own."""
        return self.image_size if self.image_size is not None else self.spec.image_size

    def but(self, **changes) -> "EngineSettings":
        """A copy with some fields changed."""
        return replace(self, **changes)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown propagation mode {mode!r}; choose local (re-track around the corrected slices) or "
                        "exact (the whole volume again)")
    return mode


@dataclass(frozen=True)
class EditRule:
    """When a local re-propagation (propagation.local_edit) stops in a direction: at the label's next conditioning
    slice, or after `slices` consecutive slices agreeing with the previous result (None: the model's memory
    window, num_maskmem), agreement being a Dice of the label's masks of at least `dice`."""

    slices: int | None = None
    dice: float = 0.99

    def check(self) -> "EditRule":
        if self.slices is not None and (isinstance(self.slices, bool) or self.slices < 1):
            raise UserError(f"edit window {self.slices}: at least 1 agreeing slice")
        if not 0.0 < self.dice <= 1.0:
            raise UserError(f"edit agreement {self.dice}: a Dice above 0, at most 1")
        return self

    def window(self, predictor) -> int:
        """The agreeing slices needed with this predictor (its num_maskmem when not set)."""
        return self.slices if self.slices is not None else int(predictor.num_maskmem)
