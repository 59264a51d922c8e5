"""The module's embedded Segment Editor: its node, its inputs and the scene's life cycle. No Slicer import here:
the widget (qMRMLSegmentEditorWidget) and the scene (vtkMRMLScene) are passed in, so the rules are tested headless.

- The editor node is a singleton of the module's own: File > Close Scene removes every node without a singleton
  tag, and the widget holds its node by a weak pointer, so an untagged node would leave it disabled. On scene close
  the module lets go of it and selects it again afterwards, as Slicer's Segment Editor module does.
- The widget's own segmentation and source-volume selectors are hidden and the module's parameter node decides:
  otherwise a person could paint one segmentation while Propagate reads another. If the widget changes either by
  itself (it picks a segmentation's reference volume as source), the parameter node's choice is put back.
"""

from __future__ import annotations

from collections.abc import Callable

EDITOR_NODE_TAG = "SSLMedSAM2SegmentEditor"  # not Segment Editor's own "SegmentEditor": its own effect and state
EDITOR_NODE_CLASS = "vtkMRMLSegmentEditorNode"


def module_editor_node(scene):
    """The module's segment editor node, created (singleton-tagged) when the scene has none."""
    node = scene.GetSingletonNode(EDITOR_NODE_TAG, EDITOR_NODE_CLASS)
    if node is None:
        node = scene.CreateNodeByClass(EDITOR_NODE_CLASS)
        node.UnRegister(None)  # CreateNodeByClass returns a reference Python does not own
        node.SetSingletonTag(EDITOR_NODE_TAG)
        node = scene.AddNode(node)
    return node


class EmbeddedEditor:
    """Keeps one qMRMLSegmentEditorWidget on the module's node and on the parameter node's inputs."""

    def __init__(self, widget, scene, later: Callable[[Callable[[], None]], None] = lambda call: call()) -> None:
        self.widget, self.scene, self.later = widget, scene, later
        self.segmentation = self.volume = None  # what the parameter node chose
        self._enforcing = False
        widget.setSegmentationNodeSelectorVisible(False)
        widget.setSourceVolumeNodeSelectorVisible(False)
        widget.connect("segmentationNodeChanged(vtkMRMLSegmentationNode*)", self._on_widget_changed)
        widget.connect("sourceVolumeNodeChanged(vtkMRMLVolumeNode*)", self._on_widget_changed)
        self.select_node()

    def select_node(self) -> None:
        """The module's node, in the scene; the scene is set after it, so the widget's choices land in it."""
        node = module_editor_node(self.scene)
        if self.widget.mrmlSegmentEditorNode() != node:
            self.widget.setMRMLSegmentEditorNode(node)
        self.widget.setMRMLScene(self.scene)

    def show(self, segmentation, volume) -> None:
        """Edit this segmentation over this volume (the parameter node's inputs; None for none)."""
        self.segmentation, self.volume = segmentation, volume
        self._apply()

    def _apply(self) -> None:
        self._enforcing = True
        try:
            if self.widget.segmentationNode() != self.segmentation:
                self.widget.setSegmentationNode(self.segmentation)
            if self.widget.sourceVolumeNode() != self.volume:
                self.widget.setSourceVolumeNode(self.volume)
        finally:
            self._enforcing = False

    def _on_widget_changed(self, *_) -> None:
        """The widget changed an input by itself: put the parameter node's back, once its own update is over."""
        if not self._enforcing:
            self.later(self._apply)

    def exit(self) -> None:
        """Leaving the module: no effect stays active, no view keeps the editor's observers."""
        self.widget.setActiveEffect(None)
        self.widget.removeViewObservations()

    def scene_start_close(self) -> None:
        self.segmentation = self.volume = None
        self._apply()
        self.widget.removeViewObservations()

    def scene_end_close(self, entered: bool) -> None:
        """After a scene close (or import): the node again, and the widget enabled on it (if the module shows)."""
        if entered:
            self.select_node()
            self.widget.updateWidgetFromMRML()
