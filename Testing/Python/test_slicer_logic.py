"""The module's logic end to end without Slicer: Propagate, Re-propagate, Undo and Cancel through the local engine
session (a real `sslmedsam2 serve`, random-weight SAM2), the study's model (its one-line error, its prediction in
named segments with the review from its confidence table) and "Refine with SAM2 from the best slices" (a real
`sslmedsam2 keyslices` in the QProcess, then the session).

Qt is PySide6 behind the few PythonQt names the logic uses; the scene is a small fake behind scene_io's functions,
which behaves as Slicer 5.10's source says (docs/slicer-api-check.md): ImportLabelmapToSegmentationNode gives value
i + 1 to the i-th segment id and skips empty ids; arrays are (k, j, i).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SIZE, seeds_on, synthetic_case, to_image
from test_slicer_fakes import qt_shim

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSLMedSAM2"))

SEEDS = {1: [6, 11], 2: [9, 13]}


class Volume:
    def __init__(self, array: np.ndarray, path: Path) -> None:
        self.array, self.path = array, path

    def GetName(self):  # noqa: N802 (Slicer's name)
        return "synthetic"


class Segmentation:
    """Segments by id: a name and a (k, j, i) mask."""

    def __init__(self) -> None:
        self.segments: dict[str, list] = {}

    def add(self, name: str, mask: np.ndarray) -> str:
        sid = f"Segment_{len(self.segments) + 1}"
        self.segments[sid] = [name, mask.astype(bool)]
        return sid

    def mask(self, name: str) -> np.ndarray:
        return next(mask for n, mask in self.segments.values() if n == name)


def _import(segmentation: Segmentation, labels: np.ndarray, ids: list[str]) -> None:
    """ImportLabelmapToSegmentationNode(labelmap, segmentation, updatedSegmentIDs), Slicer 5.10."""
    for index, sid in enumerate(ids):
        if sid:
            segmentation.segments[sid][1] = labels == index + 1


@pytest.fixture
def logic_module(monkeypatch, tmp_path):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    pytest.importorskip("PySide6")
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    monkeypatch.setitem(sys.modules, "qt", qt_shim())
    monkeypatch.setitem(sys.modules, "slicer", types.SimpleNamespace(app=types.SimpleNamespace(connect=lambda *a: True),
                                                                    util=types.SimpleNamespace(startupEnvironment=dict)))
    from SSLMedSAM2Lib import launch

    monkeypatch.setattr(launch, "_startup_environment", launch._startup_environment)  # the logic sets Slicer's
    monkeypatch.setitem(sys.modules, "vtk", types.SimpleNamespace())
    package = importlib.import_module("SSLMedSAM2Lib")
    for name in ("engine_process", "scene_io", "study_io", "prediction", "logic"):  # fresh, on the shims
        monkeypatch.delitem(sys.modules, f"SSLMedSAM2Lib.{name}", raising=False)
        monkeypatch.delattr(package, name, raising=False)  # `from SSLMedSAM2Lib import x` reads this first
    logic = importlib.import_module("SSLMedSAM2Lib.logic")
    scene_io = importlib.import_module("SSLMedSAM2Lib.scene_io")

    def export_volume(volume, path, compressed=True):
        sitk.WriteImage(sitk.ReadImage(str(volume.path)), str(path))
        return Path(path)

    def new_segmentation(volume, name):
        return Segmentation()

    def ensure_segments(segmentation, names):
        found = {n: sid for sid, (n, _) in segmentation.segments.items()}
        return {n: found.get(n) or segmentation.add(n, np.zeros((1,), bool)) for n in names}

    def snapshot(segmentation, volume):
        return {sid: (mask if mask.shape == volume.array.shape else np.zeros(volume.array.shape, bool)).astype(np.uint8)
                for sid, (_, mask) in segmentation.segments.items()}

    fakes = {
        "segment_ids": lambda segmentation: list(segmentation.segments),
        "snapshot": snapshot,
        "restore": lambda segmentation, volume, saved: [segmentation.segments[s].__setitem__(1, a > 0)
                                                        for s, a in saved.items()],
        "array_axis": lambda volume, axis: {"axial": 0, "coronal": 1, "sagittal": 2}[axis],
        "array_shape": lambda volume: volume.array.shape,
        "volume_key": lambda volume: (id(volume),),
        "file_name": lambda node: "synthetic",
        "export_volume": export_volume,
        "new_segmentation": new_segmentation,
        "ensure_segments": ensure_segments,
        "import_array": lambda labels, segmentation, ids, volume: _import(segmentation, labels, ids),
        "import_labels": lambda path, segmentation, ids, volume: _import(
            segmentation, sitk.GetArrayFromImage(sitk.ReadImage(str(path))), ids),
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(scene_io, name, fake)
    yield logic, app
    from SSLMedSAM2Lib.server_process import stop_shared_server

    stop_shared_server()


@pytest.fixture
def scene(tmp_path):
    image, labels = synthetic_case(shape=(16, 48, 48))
    path = tmp_path / "image.nrrd"
    sitk.WriteImage(to_image(image), str(path))
    volume = Volume(image, path)
    segmentation = Segmentation()
    seeds = seeds_on(labels, SEEDS)
    segmentation.add("liver", seeds == 1)
    segmentation.add("kidney", seeds == 2)
    return volume, segmentation, labels, seeds


def _wait(logic, app, timeout: float = 300) -> str:
    result = []
    logic.runFinished.connect(result.append)
    deadline = time.monotonic() + timeout
    while not result and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.02)
    logic.runFinished.disconnect(result.append)
    assert result, "the run did not finish"
    return result[0]


def _settings(checkpoint):
    from SSLMedSAM2Lib.parameters import EngineSettings

    return EngineSettings(model="sam2.1-tiny", checkpoint=str(checkpoint), image_size=TINY_SIZE, device="cpu")


def test_propagate_repropagate_undo_and_cancel_through_the_session(logic_module, scene, tiny_checkpoint):
    module, app = logic_module
    volume, segmentation, _, seeds = scene
    logic = module.SSLMedSAM2Logic()
    statuses, changed = [], []
    logic.message.connect(statuses.append)
    logic.reviewChanged.connect(lambda: changed.append(1))
    logic.propagate(volume, segmentation, _settings(tiny_checkpoint))
    assert logic.busy
    with pytest.raises(RuntimeError, match="still working"):  # one run at a time
        logic.propagate(volume, segmentation, _settings(tiny_checkpoint))
    assert _wait(logic, app) == ""
    assert not logic.busy and changed
    for z in SEEDS[1]:
        np.testing.assert_array_equal(segmentation.mask("liver")[z], seeds[z] == 1)
    assert segmentation.mask("liver").sum() > (seeds == 1).sum()  # propagated beyond the drawn slices
    review = logic.review
    assert [z for z, s in enumerate(review.states) if s.value == "seed"] == [6, 9, 11, 13]
    assert logic.notes[0].startswith("computed by the local engine")
    assert any("propagating from 4 slices" in s for s in statuses)

    first = review.review_order()[0]
    review.accept(first)
    before = {sid: mask.copy() for sid, (_, mask) in segmentation.segments.items()}
    sent = len(statuses)
    logic.propagate(volume, segmentation, _settings(tiny_checkpoint), prompt_slices=review.prompt_slices())
    assert _wait(logic, app) == ""
    assert review.states[first].value == "accepted"
    assert any("sending the volume" in s for s in statuses[:sent])
    assert not any("sending the volume" in s for s in statuses[sent:])  # the session holds it: not sent again
    logic.undo(volume, segmentation)  # back to the first propagation's result
    for sid, mask in before.items():
        np.testing.assert_array_equal(segmentation.segments[sid][1], mask)

    logic.propagate(volume, segmentation, _settings(tiny_checkpoint))
    logic.cancel()
    assert _wait(logic, app) == "cancelled"
    for sid, mask in before.items():  # a cancelled run changes nothing
        np.testing.assert_array_equal(segmentation.segments[sid][1], mask)
    assert logic.review is review and review.can_undo, "a cancelled Propagate keeps the review and its Undo"

    # a person paints while the engine works (in Segment Editor's own module): the result does not replace it
    logic.propagate(volume, segmentation, _settings(tiny_checkpoint))
    liver = next(sid for sid, (name, _) in segmentation.segments.items() if name == "liver")
    painted = segmentation.segments[liver][1].copy()
    painted[0, :4, :4] = ~painted[0, :4, :4]
    segmentation.segments[liver][1] = painted
    assert _wait(logic, app) == module.EDITED_DURING_RUN
    np.testing.assert_array_equal(segmentation.segments[liver][1], painted)
    assert logic.review is review

    segmentation.segments[liver][1] = before[liver]
    logic.propagate(volume, segmentation, _settings(tiny_checkpoint))  # a fresh Propagate that succeeds
    assert _wait(logic, app) == ""
    assert logic.review is not review, "a fresh Propagate that succeeds starts a new review"

    from sslmedsam2.remote.client import Client

    engine = Client(logic.engine.local.url, token_file=logic.engine.local.token_file)
    assert engine.info()["sessions"] == 1
    logic.cleanup()
    assert engine.info()["sessions"] == 0, "leaving closes the session: the volume does not stay on the engine"
    engine.close()


def test_the_studys_model_and_its_key_slices(logic_module, scene, tiny_checkpoint, tmp_path):
    from sslmedsam2.labelmap.confidence import SliceConfidence, write_confidence
    from sslmedsam2.study.review import SliceState
    from sslmedsam2.study.workspace import init_workspace

    module, app = logic_module
    volume, _, labels, _ = scene
    logic = module.SSLMedSAM2Logic()
    workspace = tmp_path / "ws"
    init_workspace(workspace, {"liver": 1, "kidney": 3})
    assert logic.study_model.predict(workspace, volume, None, "cpu") == "axial"
    error = _wait(logic, app)  # the engine's own line: nothing is trained yet
    assert "no finished refinement round yet" in error and logic.study_model.prediction is None

    # what `predict` writes: the label map in workspace values (kidney = 3) and its confidence table
    folder = tmp_path / "prediction"
    folder.mkdir()
    predicted = np.where(labels == 2, 3, labels).astype(np.uint8)
    image = to_image(predicted)
    sitk.WriteImage(image, str(folder / "prediction.nrrd"))
    rows = [SliceConfidence(z, v, "nnunet", bool((predicted[z] == v).any()), int((predicted[z] == v).sum()),
                            certainty=0.2 + 0.05 * z, confidence=0.1 + 0.05 * z)
            for z in range(len(predicted)) for v in (1, 3)]
    write_confidence(rows, folder / "prediction.confidence.csv")
    logic.study_model._load(folder, folder / "prediction.nrrd", volume, None, {"liver": 1, "kidney": 3}, "axial")
    prediction = logic.study_model.prediction
    segmentation = prediction.segmentation
    assert [n for n, _ in segmentation.segments.values()] == ["liver", "kidney"]  # named after the workspace
    np.testing.assert_array_equal(segmentation.mask("kidney"), labels == 2)
    np.testing.assert_array_equal(segmentation.mask("liver"), labels == 1)
    review = logic.review
    assert review.review_order()[0] == 0 and all(s == SliceState.UNREVIEWED for s in review.states)

    review.reject(12)  # the reviewer says nnU-Net is wrong on slice 12
    review.accept(8)
    segmentation.segments["Segment_1"][1][8, :, :20] = False  # the accepted slice holds the reviewer's content
    reviewed = segmentation.mask("liver")[8].copy()
    assert reviewed.any() and not np.array_equal(reviewed, labels[8] == 1)
    logic.study_model.refine_from_key_slices(volume, segmentation, _settings(tiny_checkpoint))
    assert _wait(logic, app) == ""
    session = logic.engine._client.session(logic.engine._volume.id)
    prompts = session["prompt_slices"]
    assert 8 in prompts and 12 not in prompts and len(prompts) >= 3
    assert any("key slices" in note for note in logic.notes)
    keys = [z for z in prompts if z != 8]
    for z in keys:  # key slices keep nnU-Net's confidence, so the review visits them in order
        assert review.confidence[z] == pytest.approx(0.1 + 0.05 * z, abs=1e-4)  # not SAM2's 1 for a seed
        assert review.states[z] == SliceState.UNREVIEWED
    assert review.states[8] == SliceState.ACCEPTED and review.states[12] == SliceState.UNREVIEWED
    np.testing.assert_array_equal(segmentation.mask("liver")[8], reviewed)  # came back as the reviewer left it
    with pytest.raises(ValueError, match="slice axis"):
        logic.study_model.refine_from_key_slices(volume, segmentation,
                                                 type(_settings(tiny_checkpoint))(axis="coronal"))
    logic.cleanup()


def test_a_volume_already_in_the_study_is_replaced_only_when_asked(logic_module, scene, tmp_path, monkeypatch):
    from SSLMedSAM2Lib import scene_io, study_io

    from sslmedsam2.study.review import SliceState
    from sslmedsam2.study.workspace import Workspace, init_workspace

    def export_segments(segmentation, volume, path, ids=None):
        ids = list(segmentation.segments) if ids is None else ids
        labels = np.zeros(volume.array.shape, np.uint8)
        for index, sid in enumerate(ids):
            labels[segmentation.segments[sid][1]] = index + 1
        reference = sitk.ReadImage(str(volume.path))
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(path))
        return Path(path), ids

    monkeypatch.setattr(scene_io, "export_segments", export_segments)
    module, _ = logic_module
    volume, segmentation, _, seeds = scene
    logic = module.SSLMedSAM2Logic()
    workspace = tmp_path / "ws"
    init_workspace(workspace, {"liver": 1, "kidney": 2})
    assert logic.add_to_study(workspace, volume, segmentation, "axial") == "synthetic"
    pseudo = workspace / "cases" / "synthetic" / "pseudo.nii.gz"
    before = pseudo.read_bytes()
    with pytest.raises(study_io.AlreadyInStudy) as already:
        logic.add_to_study(workspace, volume, segmentation, "axial")  # the same volume, a second time
    assert already.value.case == "synthetic" and pseudo.read_bytes() == before
    assert sorted(Workspace.open(workspace).cases) == ["synthetic"]

    segmentation.segments["Segment_1"][1][:] = False  # the reviewer's correction: no liver any more
    assert logic.add_to_study(workspace, volume, segmentation, "axial", replace=True) == "synthetic"
    replaced = sitk.GetArrayFromImage(sitk.ReadImage(str(pseudo)))
    np.testing.assert_array_equal(replaced, np.where(seeds == 2, 2, 0))
    ws = Workspace.open(workspace)
    assert sorted(ws.cases) == ["synthetic"] and set(ws.review("synthetic")) == {SliceState.UNREVIEWED}


@pytest.mark.skipif(os.name == "nt", reason="the fake engine commands are shell scripts")
def test_the_jobs_run_with_the_local_engines_engine_command(logic_module, tmp_path, monkeypatch):
    """Few-shot, predict, key slices and refinement run with the engine command when the local engine has one (its
    weights cache is the one asked), and in Slicer's own Python otherwise, a remote engine included."""
    from SSLMedSAM2Lib.parameters import Connection, EngineSettings
    from SSLMedSAM2Lib.refine_control import RefineControl

    module, _ = logic_module
    logic = module.SSLMedSAM2Logic()
    started, asked = [], []
    monkeypatch.setattr(logic.process, "start", lambda arguments, command="": started.append((arguments, command)))
    monkeypatch.setattr(RefineControl, "start", lambda self, arguments, command="": started.append((arguments, command)))
    monkeypatch.setattr(module, "external_models", lambda command: asked.append(command) or {"models": [
        {"name": "sam2.1-tiny", "cached": False, "size_mb": 156.0, "url": "https://example.org/tiny.pt",
         "path": "/Users/me/.cache/sslmedsam2/tiny.pt"}]})
    from sslmedsam2 import __version__

    native = tmp_path / "native" / "bin" / "sslmedsam2"  # another Python environment's engine
    native.parent.mkdir(parents=True)
    native.write_text(f"#!/bin/sh\necho 'sslmedsam2 {__version__}'\n")
    native.chmod(0o755)
    native = str(native)
    for connection, command in ((Connection(command=native), native), (Connection(), ""),
                                (Connection("remote", "http://127.0.0.1:8765", command=native), "")):
        logic.connection = connection
        logic.run_command(["predict", "ws", "image.nrrd"], lambda error: None)
        logic.start_refine(tmp_path / "ws", 2, True, False, "cpu")
        assert started[-2:] == [(["predict", "ws", "image.nrrd"], command), (started[-1][0], command)]
        assert started[-1][0][:2] == ["refine", str(tmp_path / "ws")]
    logic.connection = Connection(command=native)
    question = logic.weights_to_download(EngineSettings(model="sam2.1-tiny"), local_job=True)
    assert asked == [native] and "/Users/me/.cache/sslmedsam2/tiny.pt" in question and "156 MB" in question
    logic.connection = Connection("remote", "http://127.0.0.1:8765", command=native)
    question = logic.weights_to_download(EngineSettings(model="sam2.1-tiny"), local_job=True)
    assert asked == [native], "a remote engine's local jobs use Slicer's own cache, never the engine command's"
    assert "/Users/me/" not in question

    older = tmp_path / "older" / "sslmedsam2"  # an engine command of another version: no job starts
    older.parent.mkdir()
    older.write_text("#!/bin/sh\necho 'sslmedsam2 0.0.1'\n")
    older.chmod(0o755)
    logic.connection, count = Connection(command=str(older)), len(started)
    with pytest.raises(ValueError, match=f"is sslmedsam2 0.0.1, and this module's engine is {__version__}"):
        logic.start_refine(tmp_path / "ws", 2, True, False, "cpu")
    with pytest.raises(ValueError, match="is sslmedsam2 0.0.1"):
        logic.run_few_shot(EngineSettings(), str(tmp_path), str(tmp_path), str(tmp_path), "", 5, 0)
    assert len(started) == count and logic.fewshot_output is None
    logic.cleanup()
