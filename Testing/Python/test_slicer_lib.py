"""The Slicer module's Slicer-free library: signals, settings, engine commands (checked against the engine's own
parser) and output, the label values and prompts of the study's model (scene-side rules: test_slicer_scene.py; the
engine session: test_slicer_engine.py; dependencies and installs: test_slicer_install.py)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "SSLMedSAM2"
sys.path.insert(0, str(MODULE_DIR))

from SSLMedSAM2Lib.engine_output import EngineOutput  # noqa: E402
from SSLMedSAM2Lib.parameters import (Connection, EngineSettings, connection_problems,  # noqa: E402
                                      keyslices_command, predict_command, problems, pseudolabel_command,
                                      refine_command, serve_command)
from SSLMedSAM2Lib.signal import Signal  # noqa: E402

from sslmedsam2.cli.command import build_parser  # noqa: E402

HEADLESS = ["signal.py", "dependencies.py", "parameters.py", "engine_output.py", "launch.py", "refine_control.py",
            "editor.py", "markers.py", "geometry.py", "study_seeds.py", "server_process.py", "interactive.py",
            "compatibility.py", "requirements.py", "temporary.py", "install_panel.py"]


def test_headless_files_import_no_slicer():
    for name in HEADLESS:
        tree = ast.parse((MODULE_DIR / "SSLMedSAM2Lib" / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"slicer", "qt", "ctk", "vtk"}, name


def test_signal():
    seen = []
    signal = Signal(int, str)
    signal.connect(lambda a, b: seen.append((a, b)))
    signal.emit(1, "x")
    assert seen == [(1, "x")]
    with pytest.raises(TypeError):
        signal.emit(1)


def test_settings_problems(tmp_path):
    assert problems(EngineSettings()) == []
    bad = EngineSettings(model="sam3", image_size=100, device="tpu", checkpoint=str(tmp_path / "none.pt"))
    assert len(problems(bad)) == 4


def test_commands_are_accepted_by_the_engine_parser():
    from sslmedsam2.cli.study import _refine_options

    parser = build_parser()
    settings = EngineSettings(model="sam2.1-tiny", image_size=256, checkpoint="/x.pt", device="cpu",
                              allow_download=False)
    args = parser.parse_args(pseudolabel_command(settings, "si", "sl", "q", "o", insertions=3, supports=2))
    assert (args.command, args.insertions, args.supports, args.no_download) == ("pseudolabel", 3, 2, True)
    args = parser.parse_args(refine_command("ws", rounds=2, quick=True, warm_start=True))
    assert (args.command, args.rounds, args.quick, args.warm_start, args.sam2_from_nnunet) == \
        ("refine", 2, True, True, False)
    args = parser.parse_args(refine_command("ws", rounds=2, device="cuda", sam2=settings))
    assert (args.sam2_from_nnunet, args.model, str(args.checkpoint), args.image_size, args.no_download, args.device) \
        == (True, "sam2.1-tiny", "/x.pt", 256, True, "cuda")
    options = _refine_options(args)  # the job's own check: SAM2 settings only go with --sam2-from-nnunet
    assert (options.sam2_from_nnunet, options.sam2_model, options.sam2_image_size, options.sam2_download) == \
        (True, "sam2.1-tiny", 256, False)
    downloads = parser.parse_args(refine_command("ws", sam2=EngineSettings(allow_download=True)))
    assert downloads.model == "medsam2" and not downloads.no_download and downloads.checkpoint is None
    args = parser.parse_args(predict_command("ws", "img.nrrd", "pred.nrrd", "cpu"))
    assert (args.command, str(args.workspace), str(args.image), str(args.output), args.device) == \
        ("predict", "ws", "img.nrrd", "pred.nrrd", "cpu")
    args = parser.parse_args(keyslices_command("pred.nrrd", "seeds.nrrd", "pred.confidence.csv", "coronal"))
    assert (args.command, str(args.prediction), str(args.output), args.prob, args.axis) == \
        ("keyslices", "pred.nrrd", "seeds.nrrd", ["pred.confidence.csv"], "coronal")
    args = parser.parse_args(serve_command(settings, 40123, "/private/token"))
    assert (args.command, args.host, args.port, str(args.token_file), args.model, args.device, args.image_size,
            str(args.checkpoint), args.no_download, args.exit_with_stdin) == \
        ("serve", "127.0.0.1", 40123, "/private/token", "sam2.1-tiny", "cpu", 256, "/x.pt", True, True)


def test_engine_connection_problems(tmp_path):
    assert connection_problems(Connection()) == []
    assert connection_problems(Connection("remote", "http://127.0.0.1:8765")) == []
    assert "http://HOST:PORT" in connection_problems(Connection("remote", "127.0.0.1:8765"))[0]
    assert "http://HOST:PORT" in connection_problems(Connection("remote", ""))[0]
    assert "does not exist" in connection_problems(Connection("remote", "https://gpu:8765",
                                                              str(tmp_path / "none")))[0]
    assert "Unknown engine" in connection_problems(Connection("cloud"))[0]


def test_engine_output_parser_reads_bars_messages_and_errors():
    output = EngineOutput()
    update = output.feed("propagate:  20%|##        | 4/20 [00:01<00:04,  3.9slice/s]\rpropagate:  25%|##")
    assert update.progress == (4, 20)
    update = output.feed("       | 5/20 [00:01<00:03]\rsslmedsam2: using the cache\n")
    assert update.progress == (5, 20) and update.messages == ["using the cache"]
    update = output.feed("  2%|#          | 3.15M/156M [00:01<00:50, 3.1MB/s]\r")
    assert update.progress == (3_150_000, 156_000_000)
    update = output.feed("sslmedsam2: error: seeds.nrrd: the seed label map has no labelled voxel\n")
    assert update.error == "seeds.nrrd: the seed label map has no labelled voxel" == output.error
