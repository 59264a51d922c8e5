"""Between Slicer's scene and the engine's files: volumes and segments out, label maps back in, slice navigation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk

# The slice view that shows each anatomical axis in Slicer's default layout.
VIEW_OF_AXIS = {"axial": "Red", "sagittal": "Yellow", "coronal": "Green"}


def segment_ids(segmentation_node) -> list[str]:
    return list(segmentation_node.GetSegmentation().GetSegmentIDs())


def export_volume(volume_node, path: Path) -> Path:
    """Write without touching the node's own storage (exportNode, unlike saveNode)."""
    if not slicer.util.exportNode(volume_node, str(path)):
        raise RuntimeError(f"could not write {volume_node.GetName()} to {path}")
    return path


def export_segments(segmentation_node, volume_node, path: Path) -> tuple[Path, list[str]]:
    """Segments as one label map on the volume's grid; label i + 1 is the i-th segment returned."""
    ids = segment_ids(segmentation_node)
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, volume_node)
        export_volume(labelmap, path)
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)
    return path, ids


def import_labels(path: Path, segmentation_node, ids: list[str]) -> None:
    """Label value i + 1 of the file replaces the content of segment ids[i]."""
    labelmap = slicer.util.loadLabelVolume(str(path))
    try:
        updated = vtk.vtkStringArray()
        for segment_id in ids:
            updated.InsertNextValue(segment_id)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation_node, updated)
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)


def snapshot(segmentation_node, volume_node) -> dict[str, np.ndarray]:
    """Every segment's voxels, to put back on Undo."""
    return {sid: slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, sid, volume_node)
            for sid in segment_ids(segmentation_node)}


def restore(segmentation_node, volume_node, saved: dict[str, np.ndarray]) -> None:
    for sid, array in saved.items():
        slicer.util.updateSegmentBinaryLabelmapFromArray(array, segmentation_node, sid, volume_node)


def slice_logic(axis: str):
    return slicer.app.layoutManager().sliceWidget(VIEW_OF_AXIS[axis]).sliceLogic()


def current_slice(axis: str, volume_node) -> int | None:
    """0-based slice index shown in the axis's view (None when the view is oblique to the volume)."""
    logic = slice_logic(axis)
    index = logic.GetSliceIndexFromOffset(logic.GetSliceOffset(), volume_node)
    return index - 1 if index > 0 else None


def jump_to_slice(axis: str, volume_node, z: int) -> None:
    """Centre every view on slice z along the axis (the IJK axis closest to it)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    dims = volume_node.GetImageData().GetDimensions()
    row = {"sagittal": 0, "coronal": 1, "axial": 2}[axis]  # R, A, S
    normal = [abs(matrix.GetElement(row, k)) for k in range(3)]  # how much each IJK axis runs along it
    ijk = [(d - 1) / 2 for d in dims]
    ijk[int(np.argmax(normal))] = z
    ras = matrix.MultiplyPoint([*ijk, 1.0])[:3]
    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def show_marker(axis: str, text: str) -> None:
    """A line in the corner of the axis's slice view: the slice's review state."""
    view = slicer.app.layoutManager().sliceWidget(VIEW_OF_AXIS[axis]).sliceView()
    view.cornerAnnotation().SetText(vtk.vtkCornerAnnotation.UpperRight, text)
    view.forceRender()
