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
    # an explicit {}: exportNode's default properties dict is shared and remembers the last file format
    if not slicer.util.exportNode(volume_node, str(path), {}):
        raise RuntimeError(f"could not write {volume_node.GetName()} to {path}")
    return path


def export_segments(segmentation_node, volume_node, path: Path, ids: list[str] | None = None) -> tuple[Path, list[str]]:
    """Segments as one label map on the volume's grid; label i + 1 is the i-th segment id (default: all, in order)."""
    ids = segment_ids(segmentation_node) if ids is None else ids
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                                                 volume_node):
            raise RuntimeError(f"could not export the segments of {segmentation_node.GetName()}")
        export_volume(labelmap, path)
    finally:
        _remove_labelmap(labelmap)
    return path, ids


def _remove_labelmap(labelmap) -> None:
    """The export adds a colour table too; it goes with the label map."""
    display = labelmap.GetDisplayNode()
    if display is not None and display.GetColorNode() is not None:
        slicer.mrmlScene.RemoveNode(display.GetColorNode())
    slicer.mrmlScene.RemoveNode(labelmap)


def reference_volume(segmentation_node):
    """The volume a segmentation was drawn on (its reference geometry), or None."""
    return segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole())


def file_name(node) -> str:
    """A file-system-safe name for a node."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in node.GetName()) or node.GetID()


def import_labels(path: Path, segmentation_node, ids: list[str]) -> None:
    """Label value i + 1 of the file replaces the content of segment ids[i]."""
    labelmap = slicer.util.loadVolume(str(path), {"labelmap": True, "show": False})
    try:
        updated = vtk.vtkStringArray()  # this overload needs a vtkStringArray, not a list
        for segment_id in ids:
            updated.InsertNextValue(segment_id)
        if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation_node, updated):
            raise RuntimeError(f"could not import {path.name} into {segmentation_node.GetName()}")
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


def _ijk_axis(volume_node, axis: str) -> int:
    """The IJK axis that runs closest to the anatomical axis (as the engine chooses it)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    row = {"sagittal": 0, "coronal": 1, "axial": 2}[axis]  # R, A, S
    return int(np.argmax([abs(matrix.GetElement(row, k)) for k in range(3)]))


def array_axis(volume_node, axis: str) -> int:
    """The numpy axis (of Slicer's KJI arrays) along which `axis` slices are stacked."""
    return 2 - _ijk_axis(volume_node, axis)


def jump_to_slice(axis: str, volume_node, z: int) -> None:
    """Centre every view on slice z along the axis."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    ijk = [(d - 1) / 2 for d in volume_node.GetImageData().GetDimensions()]
    ijk[_ijk_axis(volume_node, axis)] = z
    ras = matrix.MultiplyPoint([*ijk, 1.0])[:3]
    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


_markers: dict[str, vtk.vtkTextActor] = {}


def show_marker(axis: str, text: str) -> None:
    """A line at the bottom of the axis's slice view: the slice's review state.

    Its own text actor, since DataProbe rewrites the corner annotations on every slice change.
    """
    view = slicer.app.layoutManager().sliceWidget(VIEW_OF_AXIS[axis]).sliceView()
    actor = _markers.get(axis)
    if actor is None:
        actor = _markers[axis] = vtk.vtkTextActor()
        actor.GetTextProperty().SetFontSize(14)
        actor.GetTextProperty().SetColor(1.0, 0.85, 0.2)
        actor.SetDisplayPosition(10, 28)
        view.renderWindow().GetRenderers().GetFirstRenderer().AddActor2D(actor)
    actor.SetInput(text)
    view.forceRender()
