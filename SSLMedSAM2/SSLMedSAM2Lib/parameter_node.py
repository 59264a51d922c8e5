"""The module's state in the scene (saved with it), bound to the panel's widgets by their SlicerParameterName."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from SSLMedSAM2Lib.parameters import AXES, DEVICES, ENGINES, MODELS, Connection, EngineSettings


def _path(value) -> str:
    """An empty path field reads as "" or "."."""
    return str(value) if value and str(value) not in ("", ".") else ""


@parameterNodeWrapper
class SSLMedSAM2ParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    model: Annotated[str, Choice(list(MODELS))] = "medsam2"
    checkpoint: Path
    imageSize: Annotated[int, WithinRange(0, 2048)] = 0
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    axis: Annotated[str, Choice(list(AXES))] = "axial"
    modality: Annotated[str, Choice(["mri", "ct"])] = "mri"
    supportImages: Path
    supportLabels: Path
    queryImages: Path
    fewShotOutput: Path
    insertions: Annotated[int, WithinRange(1, 50)] = 5
    supports: Annotated[int, WithinRange(0, 100)] = 0
    workspace: Path
    rounds: Annotated[int, WithinRange(1, 20)] = 5
    warmStart: bool = False
    quick: bool = False
    sam2FromNnunet: bool = False
    engine: Annotated[str, Choice(list(ENGINES))] = "local"
    serverUrl: str = ""
    serverTokenFile: Path
    engineCommand: Path

    def engine_settings(self, allow_download: bool = False) -> EngineSettings:
        return EngineSettings(model=self.model, checkpoint=_path(self.checkpoint), image_size=self.imageSize,
                              device=self.device, axis=self.axis, modality=self.modality, allow_download=allow_download)

    def connection(self) -> Connection:
        return Connection(self.engine, self.serverUrl.strip(), _path(self.serverTokenFile), _path(self.engineCommand))
