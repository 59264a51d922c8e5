"""The module's self-test in Slicer: the real logic on a synthetic volume with a tiny random-weight SAM2, through the
module's local engine (a `sslmedsam2 serve` it starts, as Propagate does).

It runs from the build tree too (ctest), where CMakeLists copies the engine beside the module. A Slicer where the
engine cannot run (a dashboard's, without torch; macOS x86_64) checks that the engine package is found and runs,
then logs why the SAM2 part does not run and passes: ctest, "Reload and Test" and the SelfTests module (which call
runTest() directly, where a unittest.SkipTest would be an error) all see a pass. Its processes open no window on
Windows.
"""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import slicer

from SSLMedSAM2Lib.dependencies import self_test_skip_reason
from SSLMedSAM2Lib.launch import child_options, engine_environment, engine_source, python_interpreter
from SSLMedSAM2Lib.logic import SSLMedSAM2Logic
from SSLMedSAM2Lib.parameters import EngineSettings
from SSLMedSAM2Lib.temporary import TEMPORARY

_MAKE_CHECKPOINT = """
import sys, torch
from sslmedsam2.models import get_model
from sslmedsam2.propagation.builder import build_predictor
torch.manual_seed(0)
predictor = build_predictor(get_model("sam2.1-tiny"), None, "cpu", 128)
torch.save({"model": predictor.state_dict()}, sys.argv[1])
"""


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _wait(logic: SSLMedSAM2Logic, timeout: float = 600) -> str:
    result = []
    logic.runFinished.connect(result.append)
    deadline = time.time() + timeout
    while not result and time.time() < deadline:
        slicer.app.processEvents()
        time.sleep(0.05)
    logic.runFinished.disconnect(result.append)
    if not result:
        raise AssertionError("the propagation did not finish in time")
    return result[0]


def check_engine_is_found(test) -> None:
    """The engine package beside the module (source checkout, build tree or install) and the real interpreter
    (not the PythonSlicer launcher, so that Cancel reaches the engine) runs it."""
    test.assertIsNotNone(engine_source(), "the engine package sslmedsam2 is not beside the module")
    done = subprocess.run([python_interpreter(), "-c", "import sslmedsam2; print(sslmedsam2.__file__)"],
                          capture_output=True, text=True, env=engine_environment(), stdin=subprocess.DEVNULL,
                          **child_options())
    test.assertEqual(done.returncode, 0, done.stderr)
    test.assertTrue(Path(done.stdout.strip()).resolve().is_relative_to(engine_source().resolve()), done.stdout)


def test_propagation_on_synthetic_volume(test) -> str | None:
    """The self-test; returns why the SAM2 part did not run (logged, and shown), or None when it ran."""
    test.delayDisplay("Checking that the engine is found")
    check_engine_is_found(test)
    reason = self_test_skip_reason()
    if reason:
        message = f"SSLMedSAM2 self-test passed without the SAM2 propagation: {reason}"
        logging.info(message)
        test.delayDisplay(message)
        return reason
    folder = TEMPORARY.make("SSLMedSAM2-test-")
    try:
        _propagate(test, folder / "tiny.pt")
    finally:
        TEMPORARY.remove(folder)
    return None


def _propagate(test, checkpoint: Path) -> None:
    test.delayDisplay("Building a random-weight SAM2.1 Hiera-T checkpoint")
    subprocess.run([python_interpreter(), "-c", _MAKE_CHECKPOINT, str(checkpoint)], check=True,
                   env=engine_environment(), stdin=subprocess.DEVNULL, **child_options())

    shape = (20, 48, 48)
    labels = np.zeros(shape, np.uint8)
    labels[_ellipsoid(shape, (9, 18, 18), (7, 9, 10))] = 1
    labels[_ellipsoid(shape, (11, 32, 31), (5, 6, 6))] = 2
    image = (100 + 250 * (labels == 1) + 150 * (labels == 2)).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(image, name="synthetic")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    seeds = {1: [5, 12], 2: [9, 13]}
    for value, slices in seeds.items():
        sid = segmentation.GetSegmentation().AddEmptySegment("", f"structure{value}")
        drawn = np.zeros(shape, np.uint8)
        for z in slices:
            drawn[z] = labels[z] == value
        slicer.util.updateSegmentBinaryLabelmapFromArray(drawn, segmentation, sid, volume)

    logic = SSLMedSAM2Logic()
    settings = EngineSettings(model="sam2.1-tiny", checkpoint=str(checkpoint), image_size=128, device="cpu")
    test.delayDisplay("Propagating")
    logic.propagate(volume, segmentation, settings)
    test.assertEqual(_wait(logic), "")
    test.assertTrue(logic.notes and logic.notes[0].startswith("computed by the local engine"), logic.notes)
    ids = list(segmentation.GetSegmentation().GetSegmentIDs())
    for sid, (value, slices) in zip(ids, seeds.items()):
        result = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, sid, volume)
        for z in slices:
            test.assertTrue(np.array_equal(result[z] > 0, labels[z] == value), f"seed slice {z} changed")
    review = logic.review
    test.assertIsNotNone(review)
    test.assertEqual(len(review.states), shape[0])
    test.assertEqual(review.prompt_slices(), sorted({z for s in seeds.values() for z in s}))

    test.delayDisplay("Reviewing and re-propagating")
    first = review.review_order()[0]
    review.accept(first)
    logic.propagate(volume, segmentation, settings, prompt_slices=review.prompt_slices())
    test.assertEqual(_wait(logic), "")
    test.assertEqual(review.states[first].value, "accepted")
    logic.undo(volume, segmentation)  # back to the first propagation's result
    logic.cleanup()  # closes the session; the local engine itself stops with Slicer
    test.delayDisplay("SSLMedSAM2 self-test passed")
