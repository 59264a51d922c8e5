"""Load the module's .ui in plain Qt (PySide6) and render it to a PNG: Slicer's own widgets become stand-ins.

    QT_QPA_PLATFORM=offscreen python scripts/render_ui.py Resources/Screenshots/module-panel.png
"""

from __future__ import annotations

import sys
from pathlib import Path

UI = Path(__file__).resolve().parents[1] / "SSLMedSAM2" / "Resources" / "UI" / "SSLMedSAM2.ui"


def load_panel(ui_path: Path = UI):
    """The panel as plain Qt widgets, every object name kept."""
    from PySide6.QtCore import QFile
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QComboBox, QGroupBox, QLabel, QLineEdit, QWidget

    class StandIns(QUiLoader):
        """Slicer's CTK/MRML widgets do not exist outside Slicer: similar Qt widgets take their place."""

        def createWidget(self, class_name, parent=None, name=""):  # noqa: N802 (Qt's name)
            stand_in = {"ctkCollapsibleButton": QGroupBox, "qMRMLNodeComboBox": QComboBox, "qMRMLCheckableNodeComboBox": QComboBox,
                        "ctkPathLineEdit": QLineEdit, "qMRMLWidget": QWidget}.get(class_name)
            if class_name == "qMRMLSegmentEditorWidget":
                widget = QLabel("[Slicer's Segment Editor: segments, effects, Paint, Draw, Erase, ...]", parent)
                widget.setMinimumHeight(80)
                widget.setStyleSheet("border: 1px dashed gray; color: gray")
            elif stand_in is not None:
                widget = stand_in(parent)
            else:
                return super().createWidget(class_name, parent, name)
            widget.setObjectName(name)
            return widget

    loader = StandIns()
    handle = QFile(str(ui_path))
    handle.open(QFile.ReadOnly)
    try:
        panel = loader.load(handle)
    finally:
        handle.close()
    if panel is None:
        raise RuntimeError(f"{ui_path}: Qt could not load it ({loader.errorString()})")
    for box in panel.findChildren(QGroupBox):  # a collapsible button's text is the group's title
        box.setTitle(box.property("text") or box.objectName())
    for combo, items in {"modelComboBox": ["medsam2"], "deviceComboBox": ["auto"], "axisComboBox": ["axial"],
                         "modalityComboBox": ["mri"], "inputVolumeSelector": ["MRHead"],
                         "segmentationSelector": ["Segmentation"], "supportSegmentationsSelector": ["(none checked)"],
                         "queryVolumesSelector": ["(none checked)"]}.items():
        widget = panel.findChild(QComboBox, combo)
        if widget is not None:
            widget.addItems(items)
    return panel


def render(target: Path) -> None:
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    panel = load_panel()
    panel.resize(460, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    if not panel.grab().save(str(target)):
        raise RuntimeError(f"could not write {target}")


if __name__ == "__main__":
    render(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("module-panel.png"))
