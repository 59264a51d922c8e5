"""Between Slicer's scene and the engine's files: volumes and segments out, label maps back in, slice navigation.

Files are in the volume's local frame; results go back under the volume's parent transform (geometry.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk

from SSLMedSAM2Lib.geometry import ijk_axis, put_in_frame_of, slice_centre
from SSLMedSAM2Lib.markers import ReviewMarkers

# The slice view that shows each anatomical axis in Slicer's default layout.
VIEW_OF_AXIS = {"axial": "Red", "sagittal": "Yellow", "coronal": "Green"}


def segment_ids(segmentation_node) -> list[str]:
    return list(segmentation_node.GetSegmentation().GetSegmentIDs())


def export_volume(volume_node, path: Path, compressed: bool = True) -> Path:
    """Write without touching the node's own storage (exportNode, unlike saveNode). Uncompressed for bytes that
    the engine client compresses itself (faster on the main thread)."""
    # a fresh dict: exportNode's default properties dict is shared and remembers the last file format
    if not slicer.util.exportNode(volume_node, str(path), {} if compressed else {"useCompression": 0}):
        raise RuntimeError(f"could not write {volume_node.GetName()} to {path}")
    return path


def volume_key(volume_node) -> tuple:
    """What the engine's open session of a volume depends on: the node, its voxels (VTK modification times only
    grow) and its grid."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image = volume_node.GetImageData()
    return (volume_node.GetID(), image.GetMTime() if image is not None else 0,
            tuple(round(matrix.GetElement(r, c), 9) for r in range(3) for c in range(4)))


def array_shape(volume_node) -> tuple[int, int, int]:
    """The (k, j, i) shape of the volume's voxel array."""
    return tuple(reversed(volume_node.GetImageData().GetDimensions()))


def new_segmentation(volume_node, name: str):
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return segmentation


def ensure_segments(segmentation_node, names: list[str]) -> dict[str, str]:
    """The segment id of each name, adding an empty segment for a name the segmentation lacks."""
    segmentation = segmentation_node.GetSegmentation()
    ids = {}
    for name in names:
        ids[name] = segmentation.GetSegmentIdBySegmentName(name) or segmentation.AddEmptySegment("", name)
    return ids


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


def _import_labelmap(labelmap, segmentation_node, ids: list[str], what: str) -> None:
    """Label value i + 1 replaces the content of segment ids[i]; an empty id skips its value."""
    updated = vtk.vtkStringArray()  # this overload needs a vtkStringArray, not a list
    for segment_id in ids:
        updated.InsertNextValue(segment_id)
    if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation_node, updated):
        raise RuntimeError(f"could not import {what} into {segmentation_node.GetName()}")


def import_labels(path: Path, segmentation_node, ids: list[str], volume_node) -> None:
    """Label value i + 1 of the file replaces the content of segment ids[i] ("" skips a value). The file is on the
    volume's grid in its local frame: under the volume's transform, the import maps it to the segmentation
    wherever that is."""
    labelmap = slicer.util.loadVolume(str(path), {"labelmap": True, "show": False})
    try:
        put_in_frame_of(labelmap, volume_node)
        _import_labelmap(labelmap, segmentation_node, ids, path.name)
    finally:
        slicer.mrmlScene.RemoveNode(labelmap)


def import_array(labels: np.ndarray, segmentation_node, ids: list[str], volume_node) -> None:
    """As import_labels, from a (k, j, i) array on the volume's grid (an engine session's result). The temporary
    label map copies the volume's grid and parent transform (CreateAndAddLabelVolume, as
    slicer.util.updateSegmentBinaryLabelmapFromArray does)."""
    labelmap = slicer.modules.volumes.logic().CreateAndAddLabelVolume(volume_node, "SSLMedSAM2 result")
    try:
        slicer.util.updateVolumeFromArray(labelmap, np.ascontiguousarray(labels))
        _import_labelmap(labelmap, segmentation_node, ids, "the engine's result")
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


def _ijk_to_ras(volume_node) -> list[list[float]]:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return [[matrix.GetElement(row, column) for column in range(4)] for row in range(4)]


def array_axis(volume_node, axis: str) -> int:
    """The numpy axis (of Slicer's KJI arrays) along which `axis` slices are stacked."""
    return 2 - ijk_axis(_ijk_to_ras(volume_node), axis)


def _to_world(volume_node):
    def convert(local) -> list[float]:
        world = [0.0, 0.0, 0.0]
        volume_node.TransformPointToWorld([float(v) for v in local], world)  # through its parent transforms
        return world

    return convert


def jump_to_slice(axis: str, volume_node, z: int) -> None:
    """Centre every view on slice z along the axis, where the slice is in world (after the volume's transform)."""
    matrix = _ijk_to_ras(volume_node)
    ras = slice_centre(matrix, volume_node.GetImageData().GetDimensions(), ijk_axis(matrix, axis), z,
                       _to_world(volume_node))
    slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def _new_marker_actor() -> vtk.vtkTextActor:
    """Its own text actor, since DataProbe rewrites the corner annotations on every slice change."""
    actor = vtk.vtkTextActor()
    actor.GetTextProperty().SetFontSize(14)
    actor.GetTextProperty().SetColor(1.0, 0.85, 0.2)
    actor.SetDisplayPosition(10, 28)
    return actor


def _slice_view(view: str):
    manager = slicer.app.layoutManager()
    widget = manager.sliceWidget(view) if manager is not None else None
    return widget.sliceView() if widget is not None else None


def _marker_renderer(view: str):
    slice_view = _slice_view(view)
    return slice_view.renderWindow().GetRenderers().GetFirstRenderer() if slice_view is not None else None


def _render(view: str) -> None:
    slice_view = _slice_view(view)
    if slice_view is not None:
        slice_view.forceRender()


MARKERS = ReviewMarkers(_new_marker_actor, _marker_renderer, _render)


def show_marker(axis: str, text: str) -> None:
    """A line at the bottom of the axis's slice view: the slice's review state."""
    MARKERS.show(VIEW_OF_AXIS[axis], text)


def hide_markers() -> None:
    """Leaving the module or closing the scene: no marker stays behind, frozen."""
    MARKERS.clear()
