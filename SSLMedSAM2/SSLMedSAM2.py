"""SSLMedSAM2: draw a few slices, SAM2 propagates them, review slice by slice, refine with nnU-Net.

The module is thin: the panel lives in SSLMedSAM2Lib, the work in the engine package `sslmedsam2`.
"""

from __future__ import annotations

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)


class SSLMedSAM2(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SSLMedSAM2"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SSLMedSAM2 developers"]
        self.parent.helpText = (
            "Draw a structure on a few slices; SAM2 propagates it through the volume. Review slice by slice "
            "(least confident first), accept, reject or correct, re-propagate, and refine a study with nnU-Net "
            "in the background. Few-shot pseudo-labels from labelled support volumes need no drawing at all.")
        self.parent.acknowledgementText = (
            "SSL-MedSAM2 (MICCAI 2025 CARE-LiSeg), SAM 2 (Meta), MedSAM2 (Wang lab), nnU-Net (DKFZ).")


class SSLMedSAM2Widget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from SSLMedSAM2Lib.widget import SSLMedSAM2PanelWidget

        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SSLMedSAM2.ui"))
        self.layout.addWidget(ui_widget)
        ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        # the panel asks for the parameter node again after a scene close (the template module's pattern)
        self.panel = SSLMedSAM2PanelWidget(ui, self.layout, lambda: SSLMedSAM2Logic().getParameterNode())
        self.panel.setParameterNode(SSLMedSAM2Logic().getParameterNode())

    def enter(self) -> None:
        self.panel.setParameterNode(SSLMedSAM2Logic().getParameterNode())
        self.panel.enter()

    def exit(self) -> None:
        self.panel.exit()

    def cleanup(self) -> None:
        if self.panel is not None:
            self.panel.cleanup()


class SSLMedSAM2Logic(ScriptedLoadableModuleLogic):
    """The scene-side parameter node; the work is in SSLMedSAM2Lib.logic and the engine."""

    def getParameterNode(self):
        from SSLMedSAM2Lib.parameter_node import SSLMedSAM2ParameterNode

        return SSLMedSAM2ParameterNode(super().getParameterNode())


class SSLMedSAM2Test(ScriptedLoadableModuleTest):
    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        from SSLMedSAM2Lib.testing import test_propagation_on_synthetic_volume

        test_propagation_on_synthetic_volume(self)
