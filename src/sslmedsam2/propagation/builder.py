"""Device choice and building a SAM2 predictor through sam2's own builder and checkpoint loader."""

from __future__ import annotations

import contextlib
import logging
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from sslmedsam2.errors import UserError
from sslmedsam2.models.registry import ModelSpec, check_image_size

PREDICTOR_TARGET = "sslmedsam2.propagation.predictor.SlicePredictor"
CROSS_ATTENTION_TARGET = "sslmedsam2.propagation.attention.MemoryCrossAttention"
def hydra_overrides(spec: ModelSpec, image_size: int | None = None) -> list[str]:
    size = check_image_size(spec.image_size if image_size is None else int(image_size))
    feat = size // 16
    overrides = [f"++model._target_={PREDICTOR_TARGET}", f"++model.image_size={size}"]
    for attention in ("self_attention", "cross_attention"):
        overrides.append(f"++model.memory_attention.layer.{attention}.feat_sizes=[{feat},{feat}]")
    overrides.append(f"++model.memory_attention.layer.cross_attention._target_={CROSS_ATTENTION_TARGET}")
    return [*overrides, *spec.overrides]


def _has_cuda_extension() -> bool:
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


# The initialisers a model's constructor draws random weights with; a strict checkpoint load replaces them all.
_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def _no_random_init():
    """Build without drawing random weights that the checkpoint overwrites anyway (sam2 loads strictly: every
    parameter and persistent buffer must come from the file)."""
    saved = {name: getattr(torch.nn.init, name) for name in _RANDOM_INITS}
    for name in _RANDOM_INITS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def build_predictor(spec: ModelSpec, checkpoint: Path | None, device: torch.device | str = "cpu",
                    image_size: int | None = None, compile: bool = False,
                    say: Callable[[str], None] = lambda message: None):
    """A `SlicePredictor` with `checkpoint` loaded (None: random weights, for tests and benchmarks); `compile`:
    its tracking steps run compiled (propagation/compiled.py), `say` tells of each compilation."""
    from sam2.build_sam import build_sam2_video_predictor

    from sslmedsam2.propagation.predictor import SlicePredictor

    overrides = hydra_overrides(spec, image_size)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"checkpoint {checkpoint}: no such file")
    sam2_log = logging.getLogger()
    level = sam2_log.level
    sam2_log.setLevel(logging.CRITICAL)  # sam2 logs key lists before its bare RuntimeError; we say it in one line
    try:
        with _no_random_init() if checkpoint is not None else contextlib.nullcontext():
            predictor = build_sam2_video_predictor(spec.config, str(checkpoint) if checkpoint else None,
                                                   device=str(device), hydra_overrides_extra=overrides)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"checkpoint {checkpoint}: not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    except KeyError as exc:
        raise UserError(f"checkpoint {checkpoint}: no {exc} entry; not a SAM2 checkpoint") from None
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else f"its weights do not fit the {spec.name} model"
        raise UserError(f"checkpoint {checkpoint}: {reason}") from None
    finally:
        sam2_log.setLevel(level)
    assert isinstance(predictor, SlicePredictor)
    if not _has_cuda_extension():
        # sam2's hole filling needs its optional CUDA extension; without it sam2 warns on every frame
        predictor.fill_hole_area = 0
    if predictor.device.type == "cuda":
        autocast_weights_in_bf16(predictor)
    if compile:
        from sslmedsam2.propagation.compiled import enable

        enable(predictor, say)
    return predictor


# Modules whose every use under CUDA autocast is a bf16 operation (linear, convolution).
_BF16_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.ConvTranspose2d)


def autocast_weights_in_bf16(model: torch.nn.Module) -> None:
    """Store in bf16 the weights that bf16 autocast would convert at every call, once: the same numbers (autocast
    rounds them the same way each time) without a conversion per layer per tracking step. The rest (norms,
    embeddings) stays float32, as autocast reads it. Only for a model that always runs under CUDA autocast."""
    for module in model.modules():
        if isinstance(module, _BF16_MODULES):
            module.to(torch.bfloat16)
