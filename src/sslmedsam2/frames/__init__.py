"""Volume -> SAM2 frames: intensity normalisation and lazily built, model-ready slices."""

from sslmedsam2.frames.intensity import CT_WINDOWS, IntensitySpec, to_uint8
from sslmedsam2.frames.video import VolumeFrames

__all__ = ["CT_WINDOWS", "IntensitySpec", "to_uint8", "VolumeFrames"]
