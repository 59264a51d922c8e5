"""Volume -> SAM2 frames: intensity normalisation (here) and lazily built model-ready slices (frames.video, torch)."""

from sslmedsam2.frames.intensity import CT_WINDOWS, IntensitySpec, to_uint8

__all__ = ["CT_WINDOWS", "IntensitySpec", "to_uint8"]
