"""Many videos -> one pseudo-label: mean probability, threshold, largest 3D component, entropy, confidence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from sslmedsam2.fewshot.tracking import VideoResult
from sslmedsam2.labelmap.confidence import SliceConfidence
from sslmedsam2.propagation.sam2_propagation import slice_certainty

THRESHOLD = 0.5


@dataclass
class PseudoLabel:
    labels: np.ndarray  # (n, h, w) slice-first
    probabilities: np.ndarray  # (objects, n, h, w) float32, mean over videos
    uncertainty: np.ndarray  # (n, h, w) binary entropy in nats, the largest over labels
    confidence: list[SliceConfidence]
    case_confidence: float


class ProbabilityMean:
    """Running mean over videos of each query slice's per-label probability at the query's resolution."""

    def __init__(self, labels: list[int], n: int, height: int, width: int) -> None:
        self.label_values = labels
        self.height, self.width = height, width
        self.total = torch.zeros(len(labels), n, height, width)
        self.presence = torch.zeros(len(labels), n)
        self.videos = 0

    def add(self, video: VideoResult) -> None:
        for z in range(self.total.shape[1]):
            # bilinear on logits, then sigmoid: as SAM2 returns masks at the video's resolution
            up = F.interpolate(video.logits[:, z:z + 1], size=(self.height, self.width), mode="bilinear", align_corners=False)
            self.total[:, z] += torch.sigmoid(up[:, 0])
        self.presence += video.presence
        self.videos += 1

    def finish(self, source: str = "fewshot") -> PseudoLabel:
        prob = self.total / max(self.videos, 1)
        presence = self.presence / max(self.videos, 1)
        best, index = prob.max(dim=0)
        lut = np.array(self.label_values)
        labels = np.where(best.numpy() > THRESHOLD, lut[index.numpy()], 0).astype(np.uint8 if lut.max() < 256 else np.uint16)
        labels = keep_largest_components(labels)
        p = prob.clamp(1e-8, 1 - 1e-8)
        entropy = -(p * p.log() + (1 - p) * (1 - p).log())
        rows = []
        for z in range(prob.shape[1]):
            certainty = slice_certainty(prob[:, z])
            for i, label in enumerate(self.label_values):
                voxels = int((labels[z] == label).sum())
                pres = float(presence[i, z])
                conf = (pres if voxels else 1.0 - pres) * float(certainty[i])
                rows.append(SliceConfidence(z, label, source, voxels > 0, voxels, pres, float(certainty[i]), math.nan, conf))
        present = [r.confidence for r in rows if r.present]
        return PseudoLabel(labels, prob.numpy(), entropy.max(dim=0).values.numpy(), rows,
                           float(np.mean(present)) if present else 0.0)


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Per label, only its largest 26-connected 3D component survives."""
    out = np.zeros_like(labels)
    structure = np.ones((3, 3, 3), bool)
    for value in (int(v) for v in np.unique(labels) if v):
        components, count = ndimage.label(labels == value, structure=structure)
        if count:
            sizes = np.bincount(components.ravel())[1:]
            out[components == int(np.argmax(sizes)) + 1] = value
    return out
