"""The compute device: which one to use, and how tracking computes on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sslmedsam2.errors import UserError
from sslmedsam2.settings import DEVICES


def resolve_device(name: str = "auto") -> torch.device:
    """auto: cuda, then mps, then cpu."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is usable by this torch build")
    elif name == "mps" and not has_mps:
        raise UserError("--device mps: Apple MPS is not available here")
    return torch.device(name)


@contextlib.contextmanager
def autocast_for(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA, with any attention kernel but cuDNN's: cuDNN plans every call on the host (about 4 ms
    each, measured on an H100), longer than a whole tracking step takes on the GPU."""
    if device.type != "cuda":
        yield
        return
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
