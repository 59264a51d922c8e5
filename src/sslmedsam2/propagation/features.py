"""The image features of a volume's slices, encoded once and kept where they fit: the store every tracker reads.

Propagation (one-shot or a server session) and the few-shot videos read their frames' encoder outputs from a
FeatureStore through `SlicePredictor._get_image_feature`, so a slice is encoded once however many passes,
labels, videos or re-propagations read it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sslmedsam2.memory import available_memory
from sslmedsam2.frames.video import VolumeFrames
from sslmedsam2.propagation.predictor import SlicePredictor
from sslmedsam2.propagation.device import autocast_for

# Share of free GPU memory a volume's features may take before they are kept in CPU memory instead.
GPU_FEATURE_SHARE = 0.4
# Share of available main memory beyond which a one-shot run does not cache features (sam2's own behaviour).
CPU_FEATURE_SHARE = 0.5


class FeatureStore:
    """Image-encoder outputs by frame name, kept on `device` (CPU when the GPU would not hold them)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._fpn: dict[object, list[torch.Tensor]] = {}
        self._pos: list[torch.Tensor] | None = None  # positional encodings are the same for every frame

    def __len__(self) -> int:
        return len(self._fpn)

    def get(self, key: object) -> dict | None:
        fpn = self._fpn.get(key)
        return None if fpn is None else {"backbone_fpn": fpn, "vision_pos_enc": self._pos}

    def put(self, key: object, backbone_out: dict) -> None:
        self._fpn[key] = [f.to(self.device) for f in backbone_out["backbone_fpn"]]
        if self._pos is None:
            self._pos = [p[:1].to(self.device) for p in backbone_out["vision_pos_enc"]]

    def move_to(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._fpn = {key: [f.to(self.device) for f in fpn] for key, fpn in self._fpn.items()}
        self._pos = None if self._pos is None else [p.to(self.device) for p in self._pos]

    @torch.inference_mode()
    def encode(self, predictor: SlicePredictor, frames: VolumeFrames, keys: Sequence, chunk: int,
               on_chunk: Callable[[int], None] | None = None) -> None:
        """Encode the frames not stored yet, `chunk` at a time (a GPU encodes a batch faster than one by one);
        `on_chunk(count)` after each chunk (progress; it may raise to stop)."""
        todo = [(i, key) for i, key in enumerate(keys) if key not in self._fpn]
        with autocast_for(predictor.device):
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                batch = frames.stack([i for i, _ in part])
                out = predictor.forward_image(batch.to(predictor.device).float())
                for b, (_, key) in enumerate(part):
                    self.put(key, {"backbone_fpn": [f[b:b + 1] for f in out["backbone_fpn"]],
                                   "vision_pos_enc": out["vision_pos_enc"]})
                if on_chunk is not None:
                    on_chunk(len(part))

    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for fpn in self._fpn.values() for f in fpn)


def frame_feature_bytes(image_size: int, element_size: int = 4) -> int:
    """Encoder outputs of one frame: SAM2's three feature levels (32, 64 and 256 channels at S/4, S/8, S/16)."""
    s = image_size
    return element_size * (32 * (s // 4) ** 2 + 64 * (s // 8) ** 2 + 256 * (s // 16) ** 2)


def feature_device(device: torch.device, image_size: int, frames: int) -> torch.device | None:
    """Where `frames` frames' features go: the GPU while they take under 40 % of its free memory, else CPU
    memory; None when even CPU memory would be strained (then frames are encoded as each pass reads them)."""
    total = frame_feature_bytes(image_size) * frames
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if total < GPU_FEATURE_SHARE * free:
            return device
    return torch.device("cpu") if total < CPU_FEATURE_SHARE * available_memory() else None


# The image encoder's peak working memory per frame, in multiples of its outputs (about 30 measured on an H100).
ENCODER_WORK_FACTOR = 40


def encode_chunk(device: torch.device, image_size: int = 1024) -> int:
    """Frames per encoder call: on a GPU as many as fit in a quarter of its free memory, up to 32 (an H100 encodes
    a frame in 9.7 ms alone, 1.1 ms in batches of 8, 0.77 ms in batches of 32 at size 512); a CPU gains nothing
    from batches and would hold more."""
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(32, free // 4 // (ENCODER_WORK_FACTOR * frame_feature_bytes(image_size)))))
