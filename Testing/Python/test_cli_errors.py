"""Every bad input: a one-line error, a non-zero exit, and no output file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import synthetic_case, table_lines, to_image

from sslmedsam2.cli import main


def _expect_error(capsys, argv, output, fragment):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("sslmedsam2: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "Traceback" not in "\n".join(err), err
    assert fragment.lower() in errors[0].lower(), errors[0]
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")], "temporary file left behind"


def _write(path, array, **geometry):
    sitk.WriteImage(to_image(array, **geometry), str(path))
    return path


@pytest.fixture
def files(tmp_path):
    image, labels = synthetic_case(shape=(10, 24, 24))
    seeds = np.zeros_like(labels)
    seeds[5] = labels[5]
    return _write(tmp_path / "image.nii.gz", image), _write(tmp_path / "seeds.nii.gz", seeds), tmp_path / "out.nii.gz"


def _propagate(image, seeds, out, *extra):
    return ["propagate", str(image), str(seeds), "-o", str(out), "--method", "interpolate", *extra]


def test_missing_image(files, capsys):
    image, seeds, out = files
    _expect_error(capsys, _propagate(image.with_name("nope.nii.gz"), seeds, out), out, "no such file")


def test_corrupt_image(files, capsys):
    image, seeds, out = files
    image.write_bytes(b"\x1f\x8b garbage that is not gzip nor nifti" * 10)
    _expect_error(capsys, _propagate(image, seeds, out), out, "not a readable image")


def test_non_image_file(files, capsys, tmp_path):
    _, seeds, out = files
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _expect_error(capsys, _propagate(text, seeds, out), out, "not a readable image")


def test_2d_image(files, capsys, tmp_path):
    _, seeds, out = files
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((24, 24), np.float32)), str(flat))
    _expect_error(capsys, _propagate(flat, seeds, out), out, "2D")


def test_4d_image(files, capsys, tmp_path):
    _, seeds, out = files
    four = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 10, 24, 24), np.float32), isVector=False), str(four))
    _expect_error(capsys, _propagate(four, seeds, out), out, "4D")


@pytest.mark.parametrize("geometry, fragment", [
    (dict(shape=(10, 24, 25)), "size"),
    (dict(origin=(0.0, 0.0, 0.0)), "origin"),
    (dict(direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)), "direction"),
])
def test_seeds_on_another_grid(files, capsys, geometry, fragment):
    image, seeds, out = files
    array = np.ones(geometry.pop("shape", (10, 24, 24)), np.uint8)
    _write(seeds, array, **geometry)
    _expect_error(capsys, _propagate(image, seeds, out), out, fragment)


def test_seeds_without_labelled_voxel(files, capsys):
    image, seeds, out = files
    _write(seeds, np.zeros((10, 24, 24), np.uint8))
    _expect_error(capsys, _propagate(image, seeds, out), out, "no labelled voxel")


def test_nan_in_image(files, capsys):
    image, seeds, out = files
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
    array[3, 4, 5] = np.nan
    image = _write(image.with_name("image.mha"), array)  # ITK's NIfTI reader turns NaN into 0; MetaImage keeps it
    _expect_error(capsys, _propagate(image, seeds, out), out, "NaN")


def test_unknown_model(files, capsys):
    image, seeds, out = files
    _expect_error(capsys, _propagate(image, seeds, out, "--model", "sam3-huge"), out, "unknown model")


def test_wrong_checksum_of_downloaded_weights(files, capsys, server):
    image, seeds, out = files
    argv = _propagate(image, seeds, out, "--model", "sam2.1-tiny")
    argv[argv.index("interpolate")] = "sam2"
    _expect_error(capsys, argv, out, "SHA256")


def test_explicit_sam2_offline_says_how_to_install(files, capsys):
    image, seeds, out = files
    argv = _propagate(image, seeds, out)
    argv[argv.index("interpolate")] = "sam2"
    _expect_error(capsys, argv, out, "by hand")


def test_corrupt_checkpoint(files, capsys, tmp_path):
    image, seeds, out = files
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    argv = _propagate(image, seeds, out, "--checkpoint", str(bad), "--model", "sam2.1-tiny", "--image-size", "128")
    argv[argv.index("interpolate")] = "sam2"
    _expect_error(capsys, argv, out, "not a readable")


@pytest.mark.parametrize("where", ["missing-folder", "parent-is-file"])
def test_output_that_cannot_be_written(files, capsys, tmp_path, where):
    image, seeds, _ = files
    if where == "missing-folder":
        out = tmp_path / "no" / "such" / "out.nii.gz"
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out.nii.gz"
    assert main(_propagate(image, seeds, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write" in err[0]
    assert not out.exists()


def test_evaluate_on_another_grid(tmp_path, capsys):
    a = _write(tmp_path / "a.nii.gz", np.ones((4, 5, 6), np.uint8))
    b = _write(tmp_path / "b.nii.gz", np.ones((4, 5, 7), np.uint8))
    assert main(["evaluate", str(a), str(b)]) == 1
    assert "size" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["propagate"], ["evaluate"], ["models"], ["demo"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert "usage: sslmedsam2" in capsys.readouterr().out


def test_real_process_exit_code_and_single_line(files):
    image, seeds, out = files
    done = subprocess.run([sys.executable, "-m", "sslmedsam2", "propagate", str(image), str(image.with_name("x.nii.gz")),
                           "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert not out.exists()


def test_seed_slices_keeps_only_the_listed_slices(tmp_path, capsys):
    image, labels = synthetic_case(shape=(10, 24, 24))
    seeds = labels.copy()  # every slice drawn, as a full segmentation after review would be
    img, sds = _write(tmp_path / "i.nii.gz", image), _write(tmp_path / "s.nii.gz", seeds)
    out = tmp_path / "o.nii.gz"
    assert main(["propagate", str(img), str(sds), "-o", str(out), "--method", "interpolate", "--seed-slices", "4,6"]) == 0
    import csv

    rows = list(csv.DictReader(table_lines(tmp_path / "o.confidence.csv")))
    assert {int(r["slice"]) for r in rows if r["source"] == "seed"} == {4, 6}
    _expect_error(capsys, ["propagate", str(img), str(sds), "-o", str(tmp_path / "x.nii.gz"), "--method", "interpolate",
                           "--seed-slices", "4,60"], tmp_path / "x.nii.gz", "outside")


@pytest.mark.parametrize("error", ["gpu", "ram"])
def test_out_of_memory_is_one_line(files, capsys, monkeypatch, error):
    try:
        from torch import OutOfMemoryError
    except ImportError:  # the torch-free run on Slicer's Python: torch's error is recognised by its name
        class OutOfMemoryError(RuntimeError):
            pass

    def exhausted(seeds):
        raise OutOfMemoryError("CUDA out of memory (simulated)") if error == "gpu" else MemoryError()

    monkeypatch.setattr("sslmedsam2.interpolation.contour.interpolate_between_seeds", exhausted)
    image, seeds, out = files
    _expect_error(capsys, _propagate(image, seeds, out), out, "out of GPU memory" if error == "gpu" else "out of memory")
