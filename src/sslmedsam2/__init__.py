"""SSLMedSAM2 engine: SAM2 propagation of a few drawn slices through a 3D volume, usable without 3D Slicer."""

__version__ = "0.1.0"
