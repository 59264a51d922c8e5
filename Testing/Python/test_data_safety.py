"""A run never deletes, overwrites or half-writes a user's files, and never trusts a damaged input."""

from __future__ import annotations

import gzip
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import seeds_on, synthetic_case, table_lines, to_image

from sslmedsam2.atomic import atomic_path, remove_stale_temporaries
from sslmedsam2.cli import main


def _write(path: Path, array: np.ndarray, **geometry) -> Path:
    sitk.WriteImage(to_image(array, **geometry), str(path))
    return path


@pytest.fixture
def case(tmp_path):
    """case1/ holding an image, its seeds and a full label: a clinician's folder."""
    folder = tmp_path / "case1"
    folder.mkdir()
    image, labels = synthetic_case(shape=(10, 24, 24))
    return (_write(folder / "img.nii.gz", image), _write(folder / "seeds.nii.gz", seeds_on(labels, {1: [3, 7], 2: [4, 6]})),
            _write(folder / "label.nii.gz", labels))


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, argv, fragment: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslmedsam2: error: "), err
    assert fragment.lower() in err[0].lower(), err[0]
    return err[0]


def _propagate(image, seeds, out, *extra) -> list[str]:
    return ["propagate", str(image), str(seeds), "-o", str(out), "--method", "interpolate", *extra]


# --- 1, 2: never delete or overwrite what the run did not create ---------------------------------------------
def test_output_folder_of_the_users_files_is_refused(case, capsys):
    image, seeds, _ = case
    before = _contents(image.parent)
    _one_line_error(capsys, _propagate(image, seeds, image.parent), "folder")
    assert _contents(image.parent) == before


def test_own_dicom_series_folder_is_replaced(case, tmp_path, capsys):
    image, seeds, _ = case
    out = tmp_path / "dicom_out"
    assert main(_propagate(image, seeds, out)) == 0
    first = sorted(p.name for p in out.iterdir())
    assert main(_propagate(image, seeds, out, "--seed-slices", "3,4")) == 0  # a second run replaces its own series
    assert sorted(p.name for p in out.iterdir()) == first
    (out / "notes.txt").write_text("mine")
    _one_line_error(capsys, _propagate(image, seeds, out), "other files")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("which", ["image", "seeds"])
def test_output_equal_to_an_input_is_refused(case, capsys, which):
    image, seeds, _ = case
    target = image if which == "image" else seeds
    before = target.read_bytes()
    _one_line_error(capsys, _propagate(image, seeds, target), "is the input")
    assert target.read_bytes() == before


def test_output_naming_current_folder_is_refused(case, capsys, monkeypatch, tmp_path):
    image, seeds, _ = case
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, _propagate(image, seeds, "."), "folder")


def test_pseudolabel_output_into_an_input_folder_is_refused(tmp_path, capsys):
    folders = {name: tmp_path / name for name in ("images", "labels", "queries")}
    image, labels = synthetic_case(shape=(6, 16, 16))
    for folder in folders.values():
        folder.mkdir()
    _write(folders["images"] / "s.nii.gz", image)
    manual = _write(folders["labels"] / "s.nii.gz", labels)
    _write(folders["queries"] / "s.nii.gz", image)
    before = manual.read_bytes()
    for target in folders.values():
        _one_line_error(capsys, ["pseudolabel", "--support-images", str(folders["images"]), "--support-labels",
                                 str(folders["labels"]), "--query", str(folders["queries"]), "-o", str(target)],
                        "output folder is the")
    assert manual.read_bytes() == before


def test_evaluate_csv_onto_an_input_or_a_folder_is_refused(case, capsys, tmp_path):
    _, seeds, label = case
    before = label.read_bytes()
    _one_line_error(capsys, ["evaluate", str(seeds), str(label), "--csv", str(label)], "is the input")
    assert label.read_bytes() == before
    _one_line_error(capsys, ["evaluate", str(seeds), str(label), "--csv", str(tmp_path)], "folder")


@pytest.mark.parametrize("name", ["manual_gt.nii.gz", "manual_gt.nrrd", "manual_gt.mha", "manual_gt.nii"])
def test_a_file_the_tool_did_not_write_is_replaced_only_with_overwrite(case, capsys, tmp_path, name):
    """A colleague's manual label map at the output's name is kept; --overwrite replaces it; then it is ours and a
    later run replaces it without asking."""
    image, seeds, label = case
    manual = _write(tmp_path / name, sitk.GetArrayFromImage(sitk.ReadImage(str(label))))
    before = manual.read_bytes()
    _one_line_error(capsys, _propagate(image, seeds, manual), "was not written by sslmedsam2")
    assert manual.read_bytes() == before
    assert main(_propagate(image, seeds, manual, "--overwrite")) == 0
    assert manual.read_bytes() != before
    assert main(_propagate(image, seeds, manual, "--seed-slices", "3,4")) == 0


def test_a_table_the_tool_did_not_write_is_replaced_only_with_overwrite(case, capsys, tmp_path):
    image, seeds, label = case
    table = tmp_path / "out.confidence.csv"
    table.write_text("slice,label,my notes\n1,1,keep this\n")
    _one_line_error(capsys, _propagate(image, seeds, tmp_path / "out.nii.gz"), "was not written by sslmedsam2")
    assert table.read_text() == "slice,label,my notes\n1,1,keep this\n" and not (tmp_path / "out.nii.gz").exists()
    scores = tmp_path / "scores.csv"
    scores.write_text("my own scores\n")
    _one_line_error(capsys, ["evaluate", str(seeds), str(label), "--csv", str(scores)], "--overwrite")
    assert scores.read_text() == "my own scores\n"
    assert main(["evaluate", str(seeds), str(label), "--csv", str(scores), "--overwrite"]) == 0
    assert main(["evaluate", str(seeds), str(label), "--csv", str(scores)]) == 0  # now ours: replaced


def test_a_nifti_name_beside_an_input_of_the_same_name_is_refused(case, capsys):
    """-o img.nii beside the input img.nii.gz (or the other way round): NIfTI readers take one for the other."""
    image, seeds, _ = case
    _one_line_error(capsys, _propagate(image, seeds, image.parent / "img.nii"), "same NIfTI name")
    assert not (image.parent / "img.nii").exists()
    plain = _write(image.parent / "plain.nii", sitk.GetArrayFromImage(sitk.ReadImage(str(image))))
    _one_line_error(capsys, _propagate(plain, seeds, image.parent / "plain.nii.gz"), "same NIfTI name")


def test_pseudolabel_keeps_files_it_did_not_write_under_a_querys_name(tmp_path, capsys):
    folders = {name: tmp_path / name for name in ("images", "labels", "queries", "out")}
    image, labels = synthetic_case(shape=(6, 16, 16))
    for folder in folders.values():
        folder.mkdir()
    _write(folders["images"] / "s.nii.gz", image)
    _write(folders["labels"] / "s.nii.gz", labels)
    _write(folders["queries"] / "q.nii.gz", image)
    mine = _write(folders["out"] / "q.nii.gz", labels)  # someone's file under the query's name
    before = mine.read_bytes()
    _one_line_error(capsys, ["pseudolabel", "--support-images", str(folders["images"]), "--support-labels",
                             str(folders["labels"]), "--query", str(folders["queries"]), "-o", str(folders["out"]),
                             "--no-download"], "was not written by sslmedsam2")
    assert mine.read_bytes() == before


def test_a_table_of_another_result_is_refused_by_its_readers(case, capsys, tmp_path):
    """workspace add --review-from and keyslices --prob check that the table belongs to the label map."""
    image, seeds, _ = case
    first, second = tmp_path / "first.nii.gz", tmp_path / "second.nii.gz"
    assert main(_propagate(image, seeds, first)) == 0
    assert main(_propagate(image, seeds, second, "--seed-slices", "3,4")) == 0
    other = tmp_path / "second.confidence.csv"
    assert main(["workspace", "init", str(tmp_path / "ws")]) == 0
    _one_line_error(capsys, ["workspace", "add", str(tmp_path / "ws"), "--image", str(image), "--pseudo", str(first),
                             "--review-from", str(other)], "does not belong")
    _one_line_error(capsys, ["keyslices", str(first), "--prob", str(other), "-o", str(tmp_path / "k.nii.gz")],
                    "does not belong")
    assert main(["workspace", "add", str(tmp_path / "ws"), "--image", str(image), "--pseudo", str(first),
                 "--review-from", str(tmp_path / "first.confidence.csv")]) == 0


# --- 3: a failed write leaves nothing behind and says so ------------------------------------------------------
@pytest.fixture
def file_size_limit():
    """Writes past `limit` bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ""])
def test_full_disk_during_propagate(case, tmp_path, capsys, file_size_limit, suffix):
    image, seeds, _ = case
    from sslmedsam2.interpolation.contour import WORKER

    WORKER.start()  # started before the limit, as a server's worker is
    reference = tmp_path / f"reference{suffix or '_dicom'}"
    assert main(_propagate(image, seeds, reference)) == 0
    capsys.readouterr()
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)) if suffix else
                                      sitk.ReadImage(sorted(map(str, reference.iterdir()))))
    failures = 0
    for size in (200, 700, 1500, 3000, 7000, 20000):
        out_dir = tmp_path / f"limit{size}"
        out_dir.mkdir()
        out = out_dir / f"out{suffix}"
        file_size_limit(size)
        try:
            code = main(_propagate(image, seeds, out))
        finally:
            file_size_limit(resource.RLIM_INFINITY)
        err = capsys.readouterr().err.strip().splitlines()
        if code == 0:
            result = sitk.ReadImage(str(out)) if suffix else sitk.ReadImage(sorted(map(str, out.iterdir())))
            assert np.array_equal(sitk.GetArrayFromImage(result), expected)
            assert out.with_name("out.confidence.csv").stat().st_size > 0
        else:
            failures += 1
            assert code == 1 and len(err) == 1 and "cannot write" in err[0], err
            assert list(out_dir.iterdir()) == [], "a failed write left files behind"
    assert failures, "no limit made the write fail: the test proves nothing"


def test_full_disk_during_workspace_add(case, tmp_path, capsys, file_size_limit):
    image, _, label = case
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    index = (ws / "workspace.json").read_bytes()
    file_size_limit(3000)
    try:
        code = main(["workspace", "add", str(ws), "--image", str(image), "--label", str(label)])
    finally:
        file_size_limit(resource.RLIM_INFINITY)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "cannot write" in err[-1], err
    assert (ws / "workspace.json").read_bytes() == index
    assert not [p for p in (ws / "cases").iterdir()], "a failed add left a case folder or temporary files"


# --- 4, 10: damaged or non-finite input is refused by every reader ----------------------------------------------
def _truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture(params=["isal", "zlib"])
def inflating(request, monkeypatch):
    """NIfTI files are inflated by ISA-L where python-isal is installed, else by zlib: both must refuse damage."""
    import zlib

    from sslmedsam2.volume import inflate

    if request.param == "isal":
        isal_zlib = pytest.importorskip("isal.isal_zlib")
        monkeypatch.setattr(inflate, "inflating", isal_zlib)
    else:
        monkeypatch.setattr(inflate, "inflating", zlib)
    return request.param


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused_everywhere(tmp_path, capsys, suffix, inflating):
    image, labels = synthetic_case(shape=(10, 24, 24))
    img = _truncate(_write(tmp_path / f"img{suffix}", image))
    lab = _write(tmp_path / f"lab{suffix}", labels)
    seeds = _write(tmp_path / f"seeds{suffix}", seeds_on(labels, {1: [3, 7]}))
    _one_line_error(capsys, _propagate(img, seeds, tmp_path / "o.nii.gz"), "not a readable image")
    assert main(["workspace", "init", str(tmp_path / "ws")]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["workspace", "add", str(tmp_path / "ws"), "--image", str(img)], "not a readable image")
    _truncate(lab)
    _one_line_error(capsys, ["evaluate", str(lab), str(seeds)], "not a readable image")


def test_gzip_checksum_error_is_refused(tmp_path, capsys, inflating):
    image, labels = synthetic_case(shape=(10, 24, 24))
    img = _write(tmp_path / "img.nii.gz", image)
    raw = bytearray(gzip.decompress(img.read_bytes()))
    stream = bytearray(gzip.compress(bytes(raw)))
    stream[-8] ^= 0xFF  # the CRC: the data decompresses, but is not what was written
    img.write_bytes(bytes(stream))
    seeds = _write(tmp_path / "s.nii.gz", seeds_on(labels, {1: [3]}))
    _one_line_error(capsys, _propagate(img, seeds, tmp_path / "o.nii.gz"), "damaged")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
def test_nan_slices_are_refused_with_interpolation(tmp_path, capsys, suffix):
    image, labels = synthetic_case(shape=(10, 24, 24))
    image[4] = np.nan  # SimpleITK's NIfTI reader would make these zeros
    img = _write(tmp_path / f"img{suffix}", image)
    seeds = _write(tmp_path / "s.nii.gz", seeds_on(labels, {1: [3, 7]}))
    out = tmp_path / "o.nii.gz"
    _one_line_error(capsys, _propagate(img, seeds, out), "NaN")
    assert not out.exists()


# --- 5: a sheared grid is never silently moved ---------------------------------------------------------------
SHEAR = (1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_sheared_image_is_refused_for_nifti_and_kept_exact_in_mha(tmp_path, capsys):
    image, labels = synthetic_case(shape=(10, 24, 24))
    img = _write(tmp_path / "img.mha", image, direction=SHEAR)
    seeds = _write(tmp_path / "s.mha", seeds_on(labels, {1: [3, 7]}), direction=SHEAR)
    _one_line_error(capsys, _propagate(img, seeds, tmp_path / "o.nii.gz"), "not orthogonal")
    assert not (tmp_path / "o.nii.gz").exists()
    assert main(_propagate(img, seeds, tmp_path / "o.mha")) == 0
    assert np.allclose(sitk.ReadImage(str(tmp_path / "o.mha")).GetDirection(), SHEAR)
    assert main(["workspace", "init", str(tmp_path / "ws")]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["workspace", "add", str(tmp_path / "ws"), "--image", str(img)], "not orthogonal")


# --- 6: cleaning up only what a dead process of this host left -------------------------------------------------
def test_stale_temporaries_of_a_running_job_are_kept(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        with atomic_path(tmp_path / "mine.nii.gz") as own:
            pass
        template = own.name  # .mine.<host>-<pid>-<random>.tmp.nii.gz
        host = template.split(".")[2].rsplit("-", 2)[0]
        running = tmp_path / f".case.{host}-{alive.pid}-abc.tmp.nii.gz"
        crashed = tmp_path / f".case.{host}-{dead.pid}-abc.tmp.nii.gz"
        elsewhere = tmp_path / f".case.otherhost-{dead.pid}-abc.tmp.nii.gz"
        foreign = tmp_path / ".hidden.tmp-notes"
        for path in (running, crashed, elsewhere, foreign):
            path.write_text("x")
        assert remove_stale_temporaries(tmp_path) == 1
        assert not crashed.exists() and running.exists() and elsewhere.exists() and foreign.exists()
    finally:
        alive.kill()


# --- 7: a resumed few-shot run never mixes settings ---------------------------------------------------------
def test_pseudolabel_refuses_a_folder_finished_with_other_settings(tmp_path, capsys):
    folders = {name: tmp_path / name for name in ("images", "labels", "queries", "out")}
    for folder in folders.values():
        folder.mkdir()
    image, labels = synthetic_case(shape=(6, 16, 16))
    _write(folders["images"] / "s.nii.gz", image)
    _write(folders["labels"] / "s.nii.gz", labels)
    _write(folders["queries"] / "q.nii.gz", image)
    from sslmedsam2.fewshot.job import PseudoLabelOptions

    options = PseudoLabelOptions(folders["images"], folders["labels"], folders["queries"], folders["out"])
    finished = {"query_file": "q.nii.gz", "labels": [1, 2], "case_confidence": 0.5,
                "settings": options.settings(["s.nii.gz"])}
    (folders["out"] / "q.case.json").write_text(json.dumps(finished))
    from sslmedsam2.labelmap.confidence import write_result

    write_result(to_image(labels), folders["out"] / "q.nii.gz", [])  # a finished case, as the tool writes it
    argv = ["pseudolabel", "--support-images", str(folders["images"]), "--support-labels", str(folders["labels"]),
            "--query", str(folders["queries"]), "-o", str(folders["out"]), "--no-download"]
    assert main(argv) == 0  # same settings: already done, nothing to compute
    assert "already done" in capsys.readouterr().err
    for extra, what in ((["--insertions", "3"], "insertions"), (["--image-size", "256"], "image_size"),
                        (["--seed", "7"], "seed")):
        _one_line_error(capsys, argv + extra, what)


# --- 8: concurrent changes to one workspace are serialised ---------------------------------------------------
def test_concurrent_workspace_adds_keep_every_case(tmp_path):
    image, labels = synthetic_case(shape=(6, 16, 16))
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    sources = [_write(tmp_path / f"c{i}.nii.gz", image + i) for i in range(8)]  # 8 images: an image is added once
    label = _write(tmp_path / "gt.nii.gz", labels)
    adds = [subprocess.Popen([sys.executable, "-m", "sslmedsam2", "workspace", "add", str(ws), "--image", str(p),
                              "--label", str(label)], stderr=subprocess.PIPE) for p in sources]
    assert [p.wait(timeout=300) for p in adds] == [0] * 8, [p.stderr.read() for p in adds]
    index = json.loads((ws / "workspace.json").read_text())
    assert sorted(index["cases"]) == [f"c{i}" for i in range(8)]


# --- 9: the environment's errors are one line too ------------------------------------------------------------
def test_read_only_workspace_is_a_one_line_error(tmp_path, case, capsys, monkeypatch):
    image, _, label = case
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    assert main(["workspace", "add", str(ws), "--image", str(image), "--pseudo", str(label), "--id", "c"]) == 0
    before = _contents(ws)
    if os.geteuid() == 0:  # root writes through file modes: make this folder refuse writes as a read-only mount does
        import tempfile

        import filelock

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(kwargs.get("dir") or args[0] if args else ws))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
        monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    else:
        for path in [ws, *ws.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    for argv in (["workspace", "add", str(ws), "--image", str(image), "--id", "d"],
                 ["workspace", "review", str(ws), "c", "--slices", "1", "--state", "accepted"]):
        _one_line_error(capsys, argv, "permission denied")
    assert _contents(ws) == before


def test_predict_without_a_model_writes_nothing_into_the_workspace(tmp_path, case, capsys):
    image, _, _ = case
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    before = sorted(p.name for p in ws.rglob("*"))
    _one_line_error(capsys, ["predict", str(ws), str(image), "-o", str(tmp_path / "p.nii.gz")], "no finished")
    assert sorted(p.name for p in ws.rglob("*")) == before


def test_bad_outputs_are_refused_before_any_work(case, capsys, tmp_path):
    _, seeds, _ = case
    # the image does not exist: the output's format is checked first, so nothing was read
    _one_line_error(capsys, _propagate(tmp_path / "missing.nii.gz", seeds, tmp_path / "x.png"), "unknown output format")


def test_review_from_must_be_this_cases_confidence_table(tmp_path, case, capsys):
    image, seeds, label = case
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    add = ["workspace", "add", str(ws), "--image", str(image), "--pseudo", str(label), "--review-from"]
    _one_line_error(capsys, add + [str(label)], "not a confidence table")
    other = tmp_path / "other.confidence.csv"
    other.write_text("slice,label,source,present,voxels,presence,certainty,agreement,confidence\n"
                     + "".join(f"{z},1,seed,1,4,1,1,1,1\n" for z in range(40)))
    _one_line_error(capsys, add + [str(other)], "another case")
    _one_line_error(capsys, ["workspace", "add", str(ws), "--image", str(image), "--review-from", str(other)],
                    "--pseudo")
    assert json.loads((ws / "workspace.json").read_text())["cases"] == {}


# --- 10: results honour the umask ----------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_honour_the_umask(case, tmp_path, umask):
    image, seeds, _ = case
    old = os.umask(umask)
    try:
        assert main(_propagate(image, seeds, tmp_path / "o.nii.gz")) == 0
        assert main(_propagate(image, seeds, tmp_path / "dicom")) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "o.nii.gz", tmp_path / "o.confidence.csv", next((tmp_path / "dicom").iterdir())):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    assert (tmp_path / "dicom").stat().st_mode & 0o777 == 0o777 & ~umask


# --- 11: the contour interpolation worker stays alive, and a crash is isolated --------------------------------
# (the shared per-user worker: test_interpolation_worker.py; here the child worker, Windows' and the fallback)
def test_interpolation_worker_is_reused_and_restarted_after_a_crash(monkeypatch):
    from sslmedsam2.interpolation.contour import WORKER, interpolate_between_seeds
    from sslmedsam2.labelmap.seeds import Seeds

    monkeypatch.setenv("SSLMEDSAM2_ITK_WORKER", "child")
    assert WORKER.backend() is WORKER.child
    child = WORKER.child
    _, labels = synthetic_case(shape=(10, 24, 24))
    seeds = Seeds(seeds_on(labels, {1: [3, 7]}))
    try:
        first = interpolate_between_seeds(seeds).labels
        pid = child._process.pid
        assert np.array_equal(interpolate_between_seeds(seeds).labels, first) and child._process.pid == pid
        child._process.kill()
        child._process.wait()
        assert np.array_equal(interpolate_between_seeds(seeds).labels, first)  # a new worker took over
        assert child._process.pid != pid
    finally:
        WORKER.close()  # the child ends with the test, not with the suite


# --- 12: smaller defects -------------------------------------------------------------------------------------
def test_image_size_zero_is_refused(case, capsys, tmp_path):
    image, seeds, _ = case
    _one_line_error(capsys, _propagate(image, seeds, tmp_path / "o.nii.gz", "--image-size", "0"), "image-size 0")


def test_seed_slices_naming_only_empty_slices(case, capsys, tmp_path):
    image, seeds, _ = case
    message = _one_line_error(capsys, _propagate(image, seeds, tmp_path / "o.nii.gz", "--seed-slices", "0,9"),
                              "none of slices")
    assert "[3, 7]" in message


def test_swapped_image_and_seeds_are_refused(case, capsys, tmp_path):
    image, seeds, _ = case
    rounded = tmp_path / "rounded.nii.gz"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(image)), sitk.sitkUInt16), str(rounded))
    _one_line_error(capsys, _propagate(seeds, rounded, tmp_path / "o.nii.gz"), "swapped")


def test_evaluate_gives_every_label_a_row_in_every_case(tmp_path, capsys):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    pred.mkdir()
    truth.mkdir()
    one = np.zeros((6, 16, 16), np.uint8)
    one[2:4, 4:8, 4:8] = 1
    two = np.zeros_like(one)
    two[2:4, 4:8, 4:8] = 2
    for folder in (pred, truth):
        _write(folder / "a.nii.gz", one)
        _write(folder / "b.nii.gz", two)
    assert main(["evaluate", str(pred), str(truth), "--csv", str(tmp_path / "s.csv")]) == 0
    rows = table_lines(tmp_path / "s.csv")[1:]
    assert sorted(rows) == sorted(["a.nii.gz,1,1.0000,0.0000,0.0000", "a.nii.gz,2,1.0000,0.0000,0.0000",
                                   "b.nii.gz,1,1.0000,0.0000,0.0000", "b.nii.gz,2,1.0000,0.0000,0.0000"])
