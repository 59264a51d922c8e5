"""SSLMedSAM2: draw a few slices, SAM2 propagates them, review slice by slice, refine with nnU-Net.

The module is thin: the panel lives in SSLMedSAM2Lib, the work in the engine package `sslmedsam2`. This file loads
in every Slicer (Python 3.9 syntax): a Slicer older than 5.10 gets one message and nothing else.
"""

from __future__ import annotations

import logging

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)

from SSLMedSAM2Lib.compatibility import CONTRIBUTORS, unsupported_reason


def unsupported() -> str | None:
    """Why this Slicer cannot run the module (too old, or its Python older than the engine's), else None."""
    return unsupported_reason((int(slicer.app.majorVersion), int(slicer.app.minorVersion)))


class SSLMedSAM2(ScriptedLoadableModule):
    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SSLMedSAM2"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = [CONTRIBUTORS]
        self.parent.helpText = (
            "Draw a structure on a few slices; SAM2 propagates it through the volume. Review slice by slice "
            "(least confident first), accept, reject or correct, re-propagate, and refine a study with nnU-Net "
            "in the background. Few-shot pseudo-labels from labelled support volumes need no drawing at all.")
        self.parent.acknowledgementText = (
            "SSL-MedSAM2 (MICCAI 2025 CARE-LiSeg), SAM 2 (Meta), MedSAM2 (Wang lab), nnU-Net (DKFZ).")
        reason = unsupported()
        if reason:  # said once, when Slicer loads the module; the panel shows it too
            logging.warning(reason)
            self.parent.helpText = f"{reason}\n\n{self.parent.helpText}"


class SSLMedSAM2Widget(ScriptedLoadableModuleWidget):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        reason = unsupported()
        if reason:  # the panel is this one message: nothing is imported, nothing installed
            label = qt.QLabel(reason)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        from SSLMedSAM2Lib.widget import SSLMedSAM2PanelWidget

        ui_widget = slicer.util.loadUI(self.resourcePath("UI/SSLMedSAM2.ui"))
        self.layout.addWidget(ui_widget)
        ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        # the panel asks for the parameter node again after a scene close (the template module's pattern)
        self.panel = SSLMedSAM2PanelWidget(ui, self.layout, lambda: SSLMedSAM2Logic().getParameterNode())
        self.panel.setParameterNode(SSLMedSAM2Logic().getParameterNode())

    def enter(self) -> None:
        if self.panel is not None:
            self.panel.setParameterNode(SSLMedSAM2Logic().getParameterNode())
            self.panel.enter()

    def exit(self) -> None:
        if self.panel is not None:
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
    """Passes with a logged reason where the engine cannot run (never a SkipTest: "Reload and Test" and SelfTests
    call runTest() directly and would show it as an error); propagates for real where it can."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        reason = unsupported()
        if reason:
            logging.info(f"SSLMedSAM2 self-test passed without running: {reason}")
            self.delayDisplay(reason)
            return
        from SSLMedSAM2Lib.testing import test_propagation_on_synthetic_volume

        test_propagation_on_synthetic_volume(self)
