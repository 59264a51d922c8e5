"""The bad-input corpus (bad_inputs.py) through every reader: one line that says why, exit 1, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from bad_inputs import CORPUS, SHAPE, nrrd
from conftest import synthetic_case, to_image

from sslmedsam2.cli import main
from sslmedsam2.errors import UserError
from sslmedsam2.volume import read_image, read_label_map
from sslmedsam2.volume.io import IMAGE_SUFFIXES, full_suffix

NAMES = sorted(CORPUS)


def _make(name: str, folder: Path) -> tuple[Path, str]:
    maker, fragment = CORPUS[name]
    folder.mkdir(parents=True, exist_ok=True)
    return maker(folder), fragment


def _one_line(capsys, argv: list[str], fragment: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("sslmedsam2: warning")]
    assert len(err) == 1 and err[0].startswith("sslmedsam2: error: "), err
    assert fragment.lower() in err[0].lower(), err[0]
    assert ".cxx" not in err[0] and "0x" not in err[0], err[0]  # no C++ source path or object address
    return err[0]


@pytest.mark.parametrize("name", NAMES)
def test_every_reader_function_refuses_it(tmp_path, name):
    path, fragment = _make(name, tmp_path / "in")
    for read in (read_image, read_label_map):
        with pytest.raises(UserError) as caught:
            read(path)
        message = str(caught.value)
        assert fragment.lower() in message.lower() and "\n" not in message, message


@pytest.mark.parametrize("name", NAMES)
def test_command_line_readers_refuse_it(tmp_path, capsys, name):
    """propagate (as IMAGE and as SEEDS), workspace add (as image and as ground truth), evaluate (files)."""
    path, fragment = _make(name, tmp_path / "in")
    image, labels = synthetic_case(shape=SHAPE)
    good_image, good_labels = tmp_path / "good.nii.gz", tmp_path / "good_labels.nii.gz"
    sitk.WriteImage(to_image(image), str(good_image))
    sitk.WriteImage(to_image(labels), str(good_labels))
    out = tmp_path / "out" / "o.nii.gz"
    out.parent.mkdir()
    _one_line(capsys, ["propagate", str(path), str(good_labels), "-o", str(out), "--method", "interpolate"], fragment)
    _one_line(capsys, ["propagate", str(good_image), str(path), "-o", str(out), "--method", "interpolate"], fragment)
    assert not any(out.parent.iterdir()), "nothing is written"
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    before = (ws / "workspace.json").read_text()
    _one_line(capsys, ["workspace", "add", str(ws), "--image", str(path)], fragment)
    _one_line(capsys, ["workspace", "add", str(ws), "--image", str(good_image), "--label", str(path)], fragment)
    assert (ws / "workspace.json").read_text() == before
    if path.is_file():  # evaluate reads a folder as a folder of label maps
        _one_line(capsys, ["evaluate", str(path), str(good_labels)], fragment)


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("dicom")])
def test_few_shot_support_folders_refuse_it(tmp_path, capsys, name):
    """A damaged support image or support label map stops pseudolabel before any model is built."""
    path, fragment = _make(name, tmp_path / "bad")
    if full_suffix(path).lower() not in IMAGE_SUFFIXES:
        pytest.skip("not listed as an image in a few-shot folder")
    image, labels = synthetic_case(shape=SHAPE)
    images, label_dir, queries = (tmp_path / d for d in ("images", "labels", "queries"))
    for folder in (images, label_dir, queries):
        folder.mkdir()
    sitk.WriteImage(to_image(image), str(queries / "q.nii.gz"))
    sitk.WriteImage(to_image(image), str(images / path.name))
    path.rename(label_dir / path.name)
    for sibling in path.parent.iterdir():  # a detached header's data, a NIfTI pair's .img
        sibling.rename(label_dir / sibling.name)
    argv = ["pseudolabel", "--support-images", str(images), "--support-labels", str(label_dir), "--query",
            str(queries), "-o", str(tmp_path / "out"), "--no-download"]
    _one_line(capsys, argv, fragment)


def test_a_tiny_header_declaring_gigabytes_costs_no_memory(tmp_path):
    """131 bytes that declare 1024 x 1024 x 384 floats: refused from the header, without allocating them."""
    small = nrrd(tmp_path, "huge.nrrd", b"", sizes="1024 1024 384", kind="float")
    assert small.stat().st_size < 200
    code = ("import resource, sys\nfrom sslmedsam2.volume import read_image\nbase = resource.getrusage("
            "resource.RUSAGE_SELF).ru_maxrss\ntry:\n    read_image(sys.argv[1])\nexcept Exception as exc:\n"
            "    print(type(exc).__name__, exc)\nprint((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(small)], capture_output=True, text=True, timeout=120)
    message, grown = done.stdout.strip().splitlines()
    assert message.startswith("UserError") and "incomplete voxel data" in message, message
    assert int(grown) < 100, f"{grown} MB allocated for a 131-byte file"


def test_a_header_larger_than_the_memory_is_refused_before_reading(tmp_path):
    """A raw file whose data is all there (sparse on disk) but larger than the memory available."""
    from sslmedsam2.memory import available_memory

    side = int(round((available_memory() * 2 / 4) ** (1 / 3))) + 1
    path = nrrd(tmp_path, "vast.nrrd", b"", sizes=f"{side} {side} {side}", kind="float")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size + 4 * side ** 3)  # a sparse file: no disk used
    with pytest.raises(UserError, match="GB of memory"):
        read_image(path)


def test_an_uneven_dicom_series_is_read_when_allowed(tmp_path, capsys):
    """--allow-uneven-slices reads a series with a missing slice, saying so; a duplicated slice stays refused."""
    image, labels = synthetic_case(shape=SHAPE)
    missing, _ = _make("dicom missing slice", tmp_path / "a")
    read = sitk.GetArrayFromImage(read_image(missing, allow_uneven=True))
    assert read.shape[0] == 5
    seeds = np.zeros(read.shape, np.uint8)
    seeds[1, 30:60, 30:60] = 1
    seeds[3, 30:60, 30:60] = 1
    seed_image = sitk.GetImageFromArray(seeds)
    seed_image.CopyInformation(read_image(missing, allow_uneven=True))
    sitk.WriteImage(seed_image, str(tmp_path / "seeds.nrrd"))
    out = tmp_path / "o.nrrd"
    capsys.readouterr()
    assert main(["propagate", str(missing), str(tmp_path / "seeds.nrrd"), "-o", str(out), "--method", "interpolate",
                 "--allow-uneven-slices"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "missing between" in err
    duplicated, _ = _make("dicom duplicated slice", tmp_path / "b")
    with pytest.raises(UserError, match="duplicated"):
        read_image(duplicated, allow_uneven=True)


_UPLOADED = (".nii.gz", ".nii", ".nrrd", ".mha")


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("dicom")])
def test_server_uploads_refuse_it_with_the_command_lines_words(engine_server, tmp_path, name):
    from sslmedsam2.remote.client import ServerError

    path, fragment = _make(name, tmp_path / "in")
    if not path.is_file() or full_suffix(path).lower() not in _UPLOADED or not path.stat().st_size:
        pytest.skip("not a file a client uploads as it is")
    with pytest.raises(ServerError) as refused:
        engine_server.open_session(path.read_bytes(), path.name, model="sam2.1-tiny")
    assert refused.value.status in (400, 413), refused.value
    message = str(refused.value)
    assert (fragment.lower() in message.lower() or "separate data file" in message), message
    assert str(tmp_path) not in message, "a server path is never shown"
    assert engine_server.get_json("/sessions") == []
