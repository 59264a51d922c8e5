"""Volumes on disk and their geometry: reading, writing, grid checks and the slice axis."""

from sslmedsam2.volume.geometry import SliceAxis, check_same_grid, slice_axis
from sslmedsam2.volume.io import read_image, read_label_map, write_image, write_images

__all__ = ["SliceAxis", "check_same_grid", "slice_axis", "read_image", "read_label_map", "write_image", "write_images"]
