"""The module's scene-side rules, headless: the embedded Segment Editor across File > Close Scene and bound to the
parameter node, the review marker's life cycle, and results under a volume's parent transform.

Slicer objects are small fakes that behave as Slicer 5.10's source says (docs/slicer-api-check.md): a scene close
removes every node without a singleton tag and resets the others; qMRMLSegmentEditorWidget holds its node by a
weak pointer and is disabled without one; setting a segmentation selects its reference volume as source;
ImportLabelmapToSegmentationNode maps a label map from its parent transform into the segmentation's.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSLMedSAM2"))

from SSLMedSAM2Lib.editor import EDITOR_NODE_TAG, EmbeddedEditor, module_editor_node  # noqa: E402
from SSLMedSAM2Lib.geometry import ijk_axis, put_in_frame_of, slice_centre  # noqa: E402
from SSLMedSAM2Lib.markers import ReviewMarkers  # noqa: E402


class Node:
    def __init__(self, cls: str, reference=None) -> None:
        self.cls, self.tag, self.reference, self.transform_id = cls, None, reference, None

    def SetSingletonTag(self, tag):  # noqa: N802 (Slicer's names)
        self.tag = tag

    def UnRegister(self, _):  # noqa: N802
        pass

    def SetAndObserveTransformNodeID(self, transform_id):  # noqa: N802
        self.transform_id = transform_id

    def GetTransformNodeID(self):  # noqa: N802
        return self.transform_id


class Scene:
    def __init__(self) -> None:
        self.nodes: list[Node] = []

    def GetSingletonNode(self, tag, cls):  # noqa: N802
        return next((n for n in self.nodes if n.tag == tag and n.cls == cls), None)

    def CreateNodeByClass(self, cls):  # noqa: N802
        return Node(cls)

    def AddNode(self, node):  # noqa: N802
        self.nodes.append(node)
        return node

    def close(self) -> None:
        """vtkMRMLScene::Clear(0): untagged nodes go (and die with their last reference), singletons stay."""
        self.nodes = [n for n in self.nodes if n.tag is not None]


class EditorWidget:
    """qMRMLSegmentEditorWidget as far as the module uses it."""

    def __init__(self) -> None:
        self._node = lambda: None
        self.segmentation = self.volume = None
        self.selectors_visible = {"segmentation": True, "source": True}
        self.slots: dict[str, list] = {}
        self.view_observations = True

    @property
    def enabled(self) -> bool:  # updateWidgetFromMRML disables everything without a parameter set node
        return self.mrmlSegmentEditorNode() is not None

    def mrmlSegmentEditorNode(self):  # noqa: N802
        return self._node()

    def setMRMLSegmentEditorNode(self, node):  # noqa: N802
        self._node = weakref.ref(node)  # vtkWeakPointer

    def setMRMLScene(self, scene):  # noqa: N802
        pass

    def setSegmentationNodeSelectorVisible(self, visible):  # noqa: N802
        self.selectors_visible["segmentation"] = visible

    def setSourceVolumeNodeSelectorVisible(self, visible):  # noqa: N802
        self.selectors_visible["source"] = visible

    def connect(self, signature, slot):
        self.slots.setdefault(signature, []).append(slot)

    def _emit(self, signature, node):
        for slot in self.slots.get(signature, []):
            slot(node)

    def segmentationNode(self):  # noqa: N802
        return self.segmentation

    def sourceVolumeNode(self):  # noqa: N802
        return self.volume

    def setSegmentationNode(self, node):  # noqa: N802
        if node is self.segmentation:
            return
        self.segmentation = node
        self._emit("segmentationNodeChanged(vtkMRMLSegmentationNode*)", node)
        if node is not None and node.reference is not self.volume:  # selects the segmentation's reference volume
            self.setSourceVolumeNode(node.reference)

    def setSourceVolumeNode(self, node):  # noqa: N802
        self.volume = node
        self._emit("sourceVolumeNodeChanged(vtkMRMLVolumeNode*)", node)

    def removeViewObservations(self):  # noqa: N802
        self.view_observations = False

    def setActiveEffect(self, effect):  # noqa: N802
        pass

    def updateWidgetFromMRML(self):  # noqa: N802
        pass


def _close_scene(scene: Scene, editor: EmbeddedEditor, entered: bool) -> None:
    editor.scene_start_close()  # StartCloseEvent
    scene.close()
    editor.scene_end_close(entered)  # EndCloseEvent


def test_the_editor_stays_enabled_after_close_scene():
    scene, widget = Scene(), EditorWidget()
    editor = EmbeddedEditor(widget, scene)
    node = widget.mrmlSegmentEditorNode()
    assert node.tag == EDITOR_NODE_TAG and node in scene.nodes and widget.enabled
    volume = scene.AddNode(Node("vtkMRMLScalarVolumeNode"))
    editor.show(scene.AddNode(Node("vtkMRMLSegmentationNode", reference=volume)), volume)
    _close_scene(scene, editor, entered=True)
    assert widget.enabled and widget.mrmlSegmentEditorNode() is node  # the singleton survived the close
    assert widget.segmentationNode() is None and widget.sourceVolumeNode() is None
    # closed while another module shows: enabled again on entering
    _close_scene(scene, editor, entered=False)
    editor.select_node()
    assert widget.enabled and module_editor_node(scene) is node and len(scene.nodes) == 1


def test_an_untagged_editor_node_is_what_disabled_the_editor():
    """The defect the singleton tag fixes, in the same fakes: an untagged node dies with the scene close."""
    scene, widget = Scene(), EditorWidget()
    widget.setMRMLSegmentEditorNode(scene.AddNode(Node("vtkMRMLSegmentEditorNode")))
    scene.close()
    assert not widget.enabled


def test_the_editor_edits_what_the_parameter_node_chose():
    deferred = []
    scene, widget = Scene(), EditorWidget()
    editor = EmbeddedEditor(widget, scene, later=deferred.append)
    assert widget.selectors_visible == {"segmentation": False, "source": False}
    volume, drawn_on = scene.AddNode(Node("volume")), scene.AddNode(Node("other volume"))
    segmentation = scene.AddNode(Node("vtkMRMLSegmentationNode", reference=drawn_on))
    editor.show(segmentation, volume)
    assert (widget.segmentationNode(), widget.sourceVolumeNode()) == (segmentation, volume)
    while deferred:  # nothing to put back: the module's own calls are not the widget's choice
        deferred.pop()()
    widget.setSourceVolumeNode(drawn_on)  # the widget picks another source volume by itself
    assert widget.sourceVolumeNode() is drawn_on and deferred
    while deferred:  # once the widget's own update is over
        deferred.pop()()
    assert (widget.segmentationNode(), widget.sourceVolumeNode()) == (segmentation, volume)
    editor.exit()
    assert not widget.view_observations


class Renderer:
    def __init__(self) -> None:
        self.actors: list = []

    def AddActor2D(self, actor):  # noqa: N802
        self.actors.append(actor)

    def RemoveActor2D(self, actor):  # noqa: N802
        self.actors.remove(actor)


class TextActor:
    def __init__(self) -> None:
        self.text = ""

    def SetInput(self, text):  # noqa: N802
        self.text = text


def test_the_review_marker_goes_when_it_is_cleared_and_follows_a_rebuilt_view():
    renderers, rendered = {"Red": Renderer()}, []
    markers = ReviewMarkers(TextActor, renderers.get, rendered.append)
    markers.show("Red", "slice 3: unreviewed")
    markers.show("Red", "slice 4: accepted")
    markers.show("Yellow", "no such view in this layout")
    red = renderers["Red"]
    assert [a.text for a in red.actors] == ["slice 4: accepted"] and markers.views == ["Red"]
    markers.clear()  # leaving the module, closing the scene
    assert red.actors == [] and markers.views == [] and rendered[-1] == "Red"
    markers.show("Red", "slice 5: rejected")
    renderers["Red"] = Renderer()  # a layout change rebuilt the view
    markers.show("Red", "slice 6: edited")
    assert red.actors == [] and [a.text for a in renderers["Red"].actors] == ["slice 6: edited"]


def test_the_slice_to_jump_to_is_placed_by_the_volume_transform():
    ijk_to_ras = [[0, 0, 2.0, 10], [0, 1.5, 0, 20], [1.0, 0, 0, 30], [0, 0, 0, 1]]  # I runs S, J runs A, K runs R
    assert [ijk_axis(ijk_to_ras, axis) for axis in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    local = slice_centre(ijk_to_ras, (5, 9, 11), 0, 4)
    assert local == (10 + 2.0 * 5, 20 + 1.5 * 4, 30 + 4.0)
    shift = np.array([100.0, -50.0, 7.0])
    assert slice_centre(ijk_to_ras, (5, 9, 11), 0, 4, lambda p: p + shift) == tuple(np.array(local) + shift)


def test_a_result_lands_where_its_volume_is_under_a_parent_transform():
    """Model of the round trip: exported in the volume's local frame, imported by ImportLabelmapToSegmentationNode,
    which takes the label map from its parent transform into the segmentation's (translations here)."""
    translations = {None: np.zeros(3), "T": np.array([12.0, -3.0, 40.0]), "S": np.array([1.0, 2.0, 3.0])}
    voxel_local = np.array([5.0, 6.0, 7.0])  # a result voxel: the engine's file is on the volume's local grid

    def imported_world(volume, segmentation) -> np.ndarray:
        labelmap = Node("vtkMRMLLabelMapVolumeNode")  # slicer.util.loadVolume: no parent transform
        put_in_frame_of(labelmap, volume)
        in_segmentation = voxel_local + translations[labelmap.transform_id] - translations[segmentation.transform_id]
        return in_segmentation + translations[segmentation.transform_id]

    for volume_transform in ("T", None):
        for segmentation_transform in (volume_transform, "S", None):
            volume, segmentation = Node("volume"), Node("segmentation")
            volume.transform_id, segmentation.transform_id = volume_transform, segmentation_transform
            assert np.allclose(imported_world(volume, segmentation), voxel_local + translations[volume_transform])
