"""`--compile`: the model part of the tracking step compiled for fixed shapes gives the eager step's numbers, and one
compiled shape serves a whole run (CPU here; on a GPU the same graph runs as CUDA graphs)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_SIZE, seeds_on, synthetic_case, table_lines

from sslmedsam2.cli import main
from sslmedsam2.propagation.batched import Track


def test_compiled_tracking_equals_eager(tiny_checkpoint):
    import torch

    from sslmedsam2.frames import IntensitySpec, to_uint8
    from sslmedsam2.frames.video import VolumeFrames
    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor
    from sslmedsam2.propagation.features import FeatureStore
    from sslmedsam2.propagation.sam2_propagation import run_passes
    from sslmedsam2.labelmap.seeds import Seeds

    image, labels = synthetic_case((12, 40, 40), seed=5)
    seeds = Seeds(seeds_on(labels, {1: [3, 8], 2: [9]}))
    frames = VolumeFrames(to_uint8(image, IntensitySpec()), TINY_SIZE)
    eager = build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)
    said = []
    compiled = build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE, compile=True,
                               say=said.append)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    reference = run_passes(eager, frames, seeds, store=FeatureStore())
    result = run_passes(compiled, frames, seeds, store=FeatureStore())
    assert len(said) == 1 and said[0].startswith("compiled the tracking step for 4 track(s)"), said
    (logits, presence, agreement, covered), (ref_logits, ref_presence, ref_agreement, ref_covered) = result, reference
    assert torch.sigmoid(logits).sub(torch.sigmoid(ref_logits)).abs().max() <= 1e-4
    assert presence.sub(ref_presence).abs().max() <= 1e-4 and agreement.sub(ref_agreement).abs().max() <= 1e-4
    assert torch.equal(covered, ref_covered)
    np.testing.assert_array_equal((torch.sigmoid(logits) > 0.5).numpy(), (torch.sigmoid(ref_logits) > 0.5).numpy())

    # few-shot videos through the same compiled step: a support drawn on two slices per label, two videos, so
    # the shape (4 tracks, banks of 8 frames) is the one compiled above
    from sslmedsam2.fewshot.tracking import SupportMemory, support_masks, track_videos_cached

    support_image, support_labels = synthetic_case((10, 40, 40), seed=6)
    drawn = np.zeros_like(support_labels)
    for label, planes in ((1, [6, 7]), (2, [8, 9])):
        drawn[planes] = np.where(support_labels[planes] == label, label, drawn[planes])
    support = VolumeFrames(to_uint8(support_image, IntensitySpec()), TINY_SIZE)
    masks = support_masks(drawn, 40, 40)
    videos = []
    for predictor in (eager, compiled):
        memory = SupportMemory(predictor, support, masks, [1, 2], 12 + 10, 40, 40, FeatureStore())
        videos.append(track_videos_cached(predictor, frames, FeatureStore(), memory, [2, 9]))
    assert len(said) == 1 and counters["stats"]["unique_graphs"] - graphs == 1, said  # compiled once, for all
    for ours, reference in zip(*reversed(videos)):
        assert torch.sigmoid(ours.logits).sub(torch.sigmoid(reference.logits)).abs().max() <= 1e-4
        assert ours.presence.sub(reference.presence).abs().max() <= 1e-4


def test_a_step_that_cannot_compile_falls_back_to_eager(tiny_checkpoint, tmp_path, monkeypatch):
    """Where torch's compiler stack does not work (no Triton, no C++ compiler, CUDA graphs refused), --compile
    says so in one line and the run finishes uncompiled, with the eager numbers."""
    import SimpleITK as sitk
    from conftest import to_image

    from sslmedsam2.propagation import builder as loader

    image, labels = synthetic_case((8, 32, 32), seed=2)
    sitk.WriteImage(to_image(image), str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(to_image(seeds_on(labels, {1: [3, 5]})), str(tmp_path / "seeds.nii.gz"))
    built = loader.build_predictor

    def broken_compiler(*args, **kwargs):
        predictor = built(*args, **kwargs)
        if predictor.compiled_step is not None:
            def fails(*inputs):
                raise RuntimeError("no working C++ compiler\nsecond line")
            predictor.compiled_step._run = fails
        return predictor

    argv = [str(tmp_path / "image.nii.gz"), str(tmp_path / "seeds.nii.gz"), "--method", "sam2", "--model",
            "sam2.1-tiny", "--checkpoint", str(tiny_checkpoint), "--image-size", str(TINY_SIZE), "--device", "cpu"]
    assert main(["propagate", *argv, "-o", str(tmp_path / "eager.nii.gz")]) == 0
    from sslmedsam2.session.files import run_propagate
    from sslmedsam2.settings import EngineSettings

    said = []
    monkeypatch.setattr(loader, "build_predictor", broken_compiler)
    options = EngineSettings(method="sam2", model="sam2.1-tiny", checkpoint=tiny_checkpoint, device="cpu",
                             image_size=TINY_SIZE, compile=True)
    run_propagate(tmp_path / "image.nii.gz", tmp_path / "seeds.nii.gz", tmp_path / "fallback.nii.gz", options,
                  log=said.append)
    assert [line for line in said if "--compile" in line] == [
        "--compile: the tracking step could not be compiled (RuntimeError: no working C++ compiler); tracking goes "
        "on uncompiled"]
    read = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{n}.nii.gz"))) for n in ("eager", "fallback")]
    np.testing.assert_array_equal(*read)
    assert table_lines(tmp_path / "eager.confidence.csv") == table_lines(tmp_path / "fallback.confidence.csv")


def test_bank_capacity_holds_every_memory_a_track_reads():
    from types import SimpleNamespace

    from sslmedsam2.propagation.compiled import bank_capacity

    predictor = SimpleNamespace(num_maskmem=7, max_obj_ptrs_in_encoder=16)
    tracks = [Track(0, False, {"cond_frame_outputs": dict.fromkeys(range(n))}) for n in (1, 3)]
    # 3 seeds + 6 recent memories -> 16 frames; 3 + 15 pointers -> 32 (memory_bank.assemble refuses what overflows)
    assert bank_capacity(predictor, tracks) == (16, 32)
    assert bank_capacity(predictor, tracks[:1]) == (8, 16)  # 1 + 6 frames -> at least 8; 16 pointers


def test_compile_is_the_servers_setting_with_server(tmp_path, capsys):
    image, labels = synthetic_case((6, 16, 16))
    import SimpleITK as sitk
    from conftest import to_image

    sitk.WriteImage(to_image(image), str(tmp_path / "image.nii.gz"))
    sitk.WriteImage(to_image(seeds_on(labels, {1: [2]})), str(tmp_path / "seeds.nii.gz"))
    code = main(["propagate", str(tmp_path / "image.nii.gz"), str(tmp_path / "seeds.nii.gz"), "-o",
                 str(tmp_path / "out.nii.gz"), "--server", "http://127.0.0.1:9", "--compile"])
    assert code != 0
    assert "--compile is the server's setting (sslmedsam2 serve --compile)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["propagate", "pseudolabel", "serve"])
def test_compile_is_offered_where_sam2_tracks(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--compile" in capsys.readouterr().out
