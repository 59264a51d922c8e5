"""Where the engine's files sit in Slicer's world, for a volume under a parent transform. No Slicer import here.

The image and the seeds go to the engine in the volume's own (local) frame: slicer.util.exportNode writes a node
without its parent transform (world=False), and ExportSegmentsToLabelmapNode resamples the segments onto the
volume's grid (the label map under the volume's transform). So the result comes back in that local frame too: it
must be put under the volume's transform before ImportLabelmapToSegmentationNode, which maps a label map from its
own parent transform into the segmentation's; and a slice's position is its local position taken to world.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

ANATOMICAL_ROW = {"sagittal": 0, "coronal": 1, "axial": 2}  # R, A, S rows of an IJK-to-RAS matrix


def put_in_frame_of(node, volume) -> None:
    """Put `node` (a label map or segmentation read from an engine file) under the volume's parent transform."""
    node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())


def ijk_axis(ijk_to_ras: Sequence[Sequence[float]], axis: str) -> int:
    """The IJK axis that runs closest to the anatomical axis (as the engine chooses it, in the local frame)."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    return int(np.argmax(np.abs(matrix[ANATOMICAL_ROW[axis], :3])))


def slice_centre(ijk_to_ras: Sequence[Sequence[float]], dimensions: Sequence[int], axis_index: int, index: int,
                 to_world: Callable[[np.ndarray], Sequence[float]] = lambda p: p) -> tuple[float, float, float]:
    """World position of the centre of slice `index` along IJK axis `axis_index` (to_world: the volume's parent
    transform; identity when it has none)."""
    ijk = [(d - 1) / 2 for d in dimensions]
    ijk[axis_index] = index
    local = np.asarray(ijk_to_ras, dtype=float) @ np.array([*ijk, 1.0])
    world = to_world(local[:3])
    return float(world[0]), float(world[1]), float(world[2])
