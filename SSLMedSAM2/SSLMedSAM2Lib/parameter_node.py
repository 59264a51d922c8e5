"""The module's state in the scene (saved with it), bound to the panel's widgets by their SlicerParameterName."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

from SSLMedSAM2Lib.parameters import AXES, DEVICES, MODELS, EngineSettings


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

    def engine_settings(self, allow_download: bool = False) -> EngineSettings:
        checkpoint = str(self.checkpoint) if self.checkpoint and str(self.checkpoint) not in ("", ".") else ""
        return EngineSettings(model=self.model, checkpoint=checkpoint, image_size=self.imageSize, device=self.device,
                              axis=self.axis, modality=self.modality, allow_download=allow_download)
