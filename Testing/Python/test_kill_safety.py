"""A run killed at any instant leaves the old result or the new one, never a pair that passes for one result, and
the next run into that folder removes the litter; SIGTERM and SIGHUP clean up as Ctrl-C does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import seeds_on, synthetic_case, to_image

from sslmedsam2.labelmap.confidence import check_pair, confidence_path, pair_state, read_confidence
from sslmedsam2.volume.io import image_mark

pytestmark = pytest.mark.skipif(os.name == "nt", reason="SIGKILL and SIGHUP are POSIX")

# Each call of these is a step of a write; the child kills itself with SIGKILL at step K.
_KILLER = """
import os, signal, sys, tempfile
import SimpleITK as sitk
step, target = 0, int(sys.argv[1])

def counted(function):
    def wrapper(*args, **kwargs):
        global step
        step += 1
        if step == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

for owner, name in ((os, "replace"), (os, "fsync"), (os, "chmod"), (tempfile, "mkstemp"), (tempfile, "mkdtemp"),
                    (sitk, "WriteImage")):
    setattr(owner, name, counted(getattr(owner, name)))
from sslmedsam2.cli import main
code = main(sys.argv[2:])
print("steps", step)
sys.exit(code)
"""


@pytest.fixture
def inputs(tmp_path):
    image, labels = synthetic_case(shape=(10, 24, 24))
    paths = {}
    for name, array in (("image", image), ("a", seeds_on(labels, {1: [3, 7], 2: [4, 6]})),
                        ("b", seeds_on(labels, {1: [2, 5]}))):
        paths[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(to_image(array), str(paths[name]))
    return paths


def _run(target: int, image: Path, seeds: Path, output: Path) -> subprocess.CompletedProcess:
    argv = ["propagate", str(image), str(seeds), "-o", str(output), "--method", "interpolate"]
    return subprocess.run([sys.executable, "-c", _KILLER, str(target), *argv], capture_output=True, text=True,
                          timeout=180)


def _state(output: Path) -> tuple:
    """What a reader sees: the label map's voxels and result id, and the table's rows (or None)."""
    table = confidence_path(output)
    if output.is_dir():
        voxels = tuple(sorted(p.name for p in output.iterdir()))
    else:
        voxels = sitk.GetArrayFromImage(sitk.ReadImage(str(output))).tobytes() if output.exists() else None
    rows = tuple(read_confidence(table)) if table.exists() else None
    return voxels, image_mark(output).result if output.exists() else None, rows


@pytest.mark.parametrize("name", ["out.nii.gz", "out_series"])
def test_a_kill_at_every_step_of_the_write_leaves_old_or_new_and_no_mix_unnoticed(tmp_path, inputs, name):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    output = out_dir / name
    assert _run(0, inputs["image"], inputs["a"], output).returncode == 0
    old = _state(output)
    assert _run(0, inputs["image"], inputs["a"], tmp_path / name).returncode == 0
    done = _run(10 ** 6, inputs["image"], inputs["b"], tmp_path / name)  # the steps of a run replacing a result
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout.split()[-1])
    new_rows = tuple(read_confidence(confidence_path(tmp_path / name)))
    assert new_rows != old[2]
    seen = set()
    for target in range(1, steps + 1):
        before = _state(output)
        killed = _run(target, inputs["image"], inputs["b"], output)
        assert killed.returncode in (-signal.SIGKILL, 0), killed.stderr
        after = _state(output)
        state = pair_state(output)
        seen.add(state)
        assert after[0] is not None and after[2] is not None, f"step {target}: a file is missing"
        assert after[2] in (before[2], new_rows), f"step {target}: the table is neither old nor new"
        if state == "complete":
            check_pair(output)
        else:  # a new table beside the old label map: the reader is told, never given a mix
            assert state == "mixed" and after[1] == before[1]
            with pytest.raises(Exception, match="does not belong"):
                check_pair(output)
        # the next run into this folder removes what the killed one left, and writes a complete pair
        assert _run(0, inputs["image"], inputs["a"], output).returncode == 0
        assert pair_state(output) == "complete"
        litter = [p.name for p in out_dir.iterdir() if p.name.startswith(".")]
        assert not litter, f"step {target}: {litter} left behind"
    assert "mixed" in seen and "complete" in seen  # the kills did land between the two renames, and elsewhere


_SLOW_WRITER = """
import sys, time
import SimpleITK as sitk
write = sitk.WriteImage
def slow(*args, **kwargs):
    write(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)
sitk.WriteImage = slow
from sslmedsam2.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_termination_signals_clean_up_like_ctrl_c(tmp_path, inputs, name):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    argv = ["propagate", str(inputs["image"]), str(inputs["a"]), "-o", str(out_dir / "o.nii.gz"), "--method",
            "interpolate"]
    child = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    assert [p for p in out_dir.iterdir() if p.name.startswith(".")], "a temporary file is being written"
    child.send_signal(getattr(signal, name))
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("sslmedsam2: interrupted; no output was written" if name == "SIGINT"
                                            else f"sslmedsam2: stopped by {name}; no output was written")
    assert list(out_dir.iterdir()) == []


def test_a_signal_ignored_by_the_parent_stays_ignored(tmp_path, inputs):
    """nohup ignores SIGHUP: the command must not start reacting to it."""
    code = ("import signal, sys\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\nfrom sslmedsam2.cli import command as cli\n"
            "cli.stop_on_signals()\nprint(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, "
            "signal.getsignal(signal.SIGTERM) is cli._stop)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_a_dicom_series_set_aside_by_a_killed_run_is_put_back(tmp_path, inputs):
    """Killed between moving the old series aside and moving the new one in: the next run restores the old one
    (never neither)."""
    from sslmedsam2.atomic import remove_stale_temporaries, temp_prefix

    out_dir = tmp_path / "results"
    out_dir.mkdir()
    series = out_dir / "series"
    assert _run(0, inputs["image"], inputs["a"], series).returncode == 0
    files = sorted(p.name for p in series.iterdir())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    aside = out_dir / temp_prefix("series").replace(f"-{os.getpid()}-", f"-{pid}-")
    os.replace(series, Path(f"{aside}old.tmp"))
    assert not series.exists()
    remove_stale_temporaries(out_dir)
    assert sorted(p.name for p in series.iterdir()) == files
    assert [p.name for p in out_dir.iterdir()] == ["series", "series.confidence.csv"]
