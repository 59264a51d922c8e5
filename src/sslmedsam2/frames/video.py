"""Slices as SAM2 video frames, built one at a time on the compute device: no JPEG files, no full frame stack."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# SAM2's image normalisation (ImageNet statistics), as in sam2.utils.misc.load_video_frames.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class VolumeFrames(Sequence):
    """A read-only sequence of (3, S, S) float32 frames made on demand from 8-bit slices (n, h, w).

    SAM2's predictor only calls len() and [index] on its frames, so this stands in for its preloaded tensor
    while holding only the 8-bit volume.
    """

    def __init__(self, slices: np.ndarray, image_size: int, device: torch.device | str = "cpu") -> None:
        if slices.ndim != 3 or slices.dtype != np.uint8:
            raise ValueError("slices must be a (n, h, w) uint8 array")
        self.slices = slices
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self._mean = torch.tensor(_MEAN, device=self.device).view(3, 1, 1)
        self._std = torch.tensor(_STD, device=self.device).view(3, 1, 1)

    @property
    def height(self) -> int:
        return int(self.slices.shape[1])

    @property
    def width(self) -> int:
        return int(self.slices.shape[2])

    def __len__(self) -> int:
        return int(self.slices.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.stack([index])[0]

    def stack(self, indices: Sequence[int]) -> torch.Tensor:
        """Frames (k, 3, S, S) of several slices, resized in one call (what a batched encoder call reads)."""
        grey = torch.from_numpy(np.ascontiguousarray(self.slices[list(indices)]))
        if self.device.type == "cuda":  # from pinned memory the copy is queued: the host goes on to the next batch
            grey = grey.pin_memory().to(self.device, non_blocking=True)  # while the GPU still encodes this one
        else:
            grey = grey.to(self.device)
        grey = grey.float().div_(255.0)[:, None]
        if grey.shape[-2:] != (self.image_size, self.image_size):
            # bicubic with antialiasing follows PIL's resize, which SAM2's JPEG loader uses
            grey = F.interpolate(grey, size=(self.image_size, self.image_size), mode="bicubic",
                                 align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return (grey.expand(-1, 3, -1, -1) - self._mean) / self._std
