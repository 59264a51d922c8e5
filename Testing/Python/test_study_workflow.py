"""A study from start to finish without refine's training (issue 25): importing a dataset folder, duplicates,
replacing a pseudo-label explicitly, few-shot pseudo-labels attached to the study's cases, slice ranges, the review
montage (checked pixel by pixel), the progress plot's notes and the refine bar's time left (evaluate's names and
mean rows: test_evaluate.py)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import coloured_pixels, synthetic_case, to_image

from sslmedsam2.cli import main
from sslmedsam2.errors import UserError
from sslmedsam2.labelmap.confidence import SliceConfidence, write_result
from sslmedsam2.study.review import SliceState
from sslmedsam2.study.workspace import Workspace

SHAPE = (8, 24, 24)


def _case(folder: Path, name: str, seed: int, label: bool = True) -> tuple[Path, Path | None]:
    image, labels = synthetic_case(SHAPE, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / f"{name}.nii.gz"
    sitk.WriteImage(to_image(image), str(image_path))
    if not label:
        return image_path, None
    label_path = folder / f"{name}_label.nii.gz"
    sitk.WriteImage(to_image(labels), str(label_path))
    return image_path, label_path


def _lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _one_line_error(capsys, argv: list[str], fragment: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = _lines(capsys)
    assert len(err) == 1 and err[0].startswith("sslmedsam2: error: ") and fragment in err[0], err
    return err[0]


def _files(ws: Path) -> dict[str, bytes]:
    """The workspace's files (the lock file that serialises changes aside)."""
    return {str(p.relative_to(ws)): p.read_bytes() for p in sorted(ws.rglob("*"))
            if p.is_file() and p.name != ".workspace.lock"}


# --- import ------------------------------------------------------------------------------------------------------
@pytest.fixture
def nnunet_dataset(tmp_path) -> Path:
    """imagesTr: c0, c1 with labels, c2 without its label, notes.txt; imagesTs: u0, and dup (c0's image again)."""
    root = tmp_path / "Dataset042_Blobs"
    for kind in ("imagesTr", "labelsTr", "imagesTs"):
        (root / kind).mkdir(parents=True)
    for i, name in enumerate(("c0", "c1", "c2")):
        image, labels = synthetic_case(SHAPE, seed=i)
        sitk.WriteImage(to_image(image), str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        if name != "c2":
            sitk.WriteImage(to_image(labels), str(root / "labelsTr" / f"{name}.nii.gz"))
    image, _ = synthetic_case(SHAPE, seed=5)
    sitk.WriteImage(to_image(image), str(root / "imagesTs" / "u0_0000.nii.gz"))
    (root / "imagesTs" / "dup_0000.nii.gz").write_bytes((root / "imagesTr" / "c0_0000.nii.gz").read_bytes())
    (root / "imagesTr" / "notes.txt").write_text("not an image\n")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
        "numTraining": 3, "file_ending": ".nii.gz"}))
    return root


def test_import_an_nnunet_dataset_with_a_missing_label_a_duplicate_and_a_non_image(nnunet_dataset, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    capsys.readouterr()
    assert main(["workspace", "import", str(ws), str(nnunet_dataset)]) == 0
    err = "\n".join(_lines(capsys))
    for line in ("added c0: ground truth", "added c1: ground truth", "added u0: unlabelled",
                 "skipped imagesTr/notes.txt: not an image file", "skipped c2: no label labelsTr/c2.nii.gz",
                 "skipped dup: its image is already in the workspace as case c0", "3 added"):
        assert line in err, err
    opened = Workspace.open(ws)
    assert sorted(opened.cases) == ["c0", "c1", "u0"]
    assert opened.labels == {"liver": 1, "spleen": 2}  # names from dataset.json
    assert opened.cases["c0"].has_label and not opened.cases["u0"].has_label
    index = json.loads((ws / "workspace.json").read_text())
    assert all(len(c["image_digest"]) == 64 for c in index["cases"].values())
    assert not (ws / "cases" / "c2").exists() and not (ws / "cases" / "dup").exists()
    # resumable: a second run adds nothing and says why
    before = _files(ws)
    assert main(["workspace", "import", str(ws), str(nnunet_dataset)]) == 0
    err = "\n".join(_lines(capsys))
    assert "skipped c0: already in the workspace (imported before)" in err and "0 added" in err
    assert _files(ws) == before
    # the same image under another id is refused by `add` too
    _one_line_error(capsys, ["workspace", "add", str(ws), "--image", str(nnunet_dataset / "imagesTs" / "dup_0000.nii.gz"),
                             "--id", "again"], "already in the workspace as case c0")
    assert _files(ws) == before


def test_import_refuses_labels_the_workspace_lacks_before_adding_anything(nnunet_dataset, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws), "--label", "liver=1"]) == 0
    before = _files(ws)
    _one_line_error(capsys, ["workspace", "import", str(ws), str(nnunet_dataset)], "{'spleen': 2}")
    assert _files(ws) == before
    _one_line_error(capsys, ["workspace", "import", str(ws), str(tmp_path / "nowhere")], "no such folder")


def test_import_images_and_pseudo_labels_with_their_tables(tmp_path, capsys):
    """A folder of images and, beside it, pseudo-labels with confidence tables (as `propagate` and `pseudolabel`
    write them): the tables' seed slices become the review state; --cases takes shell patterns."""
    images, labels = tmp_path / "data" / "images", tmp_path / "pl"
    for i, name in enumerate(("a1", "a2", "b1")):
        image_path, _ = _case(images, name, i, label=False)
        _, truth = synthetic_case(SHAPE, seed=i)
        rows = [SliceConfidence(z, 1, "seed" if z == 3 else "forward", bool((truth[z] == 1).any()), 0,
                                confidence=0.5) for z in range(SHAPE[0])]
        labels.mkdir(exist_ok=True)
        write_result(to_image(truth), labels / f"{name}.nii.gz", rows)
    (labels / "orphan.nii.gz").write_bytes((labels / "a1.nii.gz").read_bytes())
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    capsys.readouterr()
    assert main(["workspace", "import", str(ws), str(tmp_path / "data"), "--labels", str(labels), "--labels-as",
                 "pseudo", "--cases", "a*"]) == 0
    err = "\n".join(_lines(capsys))
    assert "added a1: pseudo-label (review state from its confidence table)" in err, err
    assert "orphan.nii.gz: a label map in" in err and "added b1" not in err
    opened = Workspace.open(ws)
    assert sorted(opened.cases) == ["a1", "a2"] and opened.cases["a1"].has_pseudo
    states = [s.value for s in opened.review("a1")]
    assert states[3] == "seed" and states.count("seed") == 1
    assert opened.table("a1") is not None  # the table travels with the pseudo-label
    _one_line_error(capsys, ["workspace", "import", str(ws), str(tmp_path / "data"), "--cases", "zz*"], "--cases zz*")


# --- replacing a pseudo-label ------------------------------------------------------------------------------------
@pytest.fixture
def study(tmp_path) -> Path:
    """ws: g0 with ground truth, p0 with a pseudo-label whose slices 1-2 a person accepted."""
    inputs = tmp_path / "in"
    image, label = _case(inputs, "c0", 0)
    image1, label1 = _case(inputs, "c1", 1)
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    assert main(["workspace", "add", str(ws), "--image", str(image), "--label", str(label), "--id", "g0"]) == 0
    assert main(["workspace", "add", str(ws), "--image", str(image1), "--pseudo", str(label), "--id", "p0"]) == 0
    assert main(["workspace", "review", str(ws), "p0", "--slices", "1-2", "--state", "accepted"]) == 0
    return ws


def test_a_pseudo_label_is_replaced_only_by_the_explicit_command(study, tmp_path, capsys):
    image1, label1 = tmp_path / "in" / "c1.nii.gz", tmp_path / "in" / "c1_label.nii.gz"
    before = _files(study)
    _one_line_error(capsys, ["workspace", "add", str(study), "--image", str(image1), "--pseudo", str(label1),
                             "--id", "p0"], "workspace update")
    assert _files(study) == before
    capsys.readouterr()
    assert main(["workspace", "update", str(study), "p0", "--pseudo", str(label1)]) == 0
    message = "\n".join(_lines(capsys))
    assert "pseudo-label replaced" in message and "dropped: 2 accepted" in message
    new = sitk.GetArrayFromImage(sitk.ReadImage(str(study / "cases" / "p0" / "pseudo.nii.gz")))
    assert np.array_equal(new, sitk.GetArrayFromImage(sitk.ReadImage(str(label1))))
    assert {s.value for s in Workspace.open(study).review("p0")} == {"unreviewed"}
    assert (study / "cases" / "p0" / "image.nii.gz").read_bytes() == before["cases/p0/image.nii.gz"]


def test_a_failed_update_changes_nothing(study, tmp_path, capsys, monkeypatch):
    before = _files(study)
    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(to_image(np.zeros((4, 24, 24), np.uint8)), str(other))
    _one_line_error(capsys, ["workspace", "update", str(study), "p0", "--pseudo", str(other)], "pseudo other.nii.gz")
    _one_line_error(capsys, ["workspace", "update", str(study), "nope", "--pseudo", str(other)], "not in the workspace")
    assert _files(study) == before

    import sslmedsam2.study.workspace as workspace

    def full_disk(*args, **kwargs):
        raise UserError("cannot write pseudo.nii.gz: No space left on device")

    monkeypatch.setattr(workspace, "write_image", full_disk)
    _one_line_error(capsys, ["workspace", "update", str(study), "p0", "--pseudo", str(tmp_path / "in" / "c1_label.nii.gz")],
                    "No space left")
    assert _files(study) == before
    assert not [p for p in (study / "cases").iterdir() if p.name.startswith(".")]


def test_review_takes_slice_ranges(study, capsys):
    assert main(["workspace", "review", str(study), "p0", "--slices", "4-6,0", "--state", "rejected"]) == 0
    assert "slices 0, 4-6 are rejected" in capsys.readouterr().err
    states = [s.value for s in Workspace.open(study).review("p0")]
    assert states == ["rejected", "accepted", "accepted", "unreviewed", "rejected", "rejected", "rejected", "unreviewed"]
    _one_line_error(capsys, ["workspace", "review", str(study), "p0", "--slices", "6-4", "--state", "accepted"],
                    "runs backwards")
    _one_line_error(capsys, ["workspace", "review", str(study), "p0", "--slices", "3-x", "--state", "accepted"],
                    "ranges")
    _one_line_error(capsys, ["workspace", "review", str(study), "p0", "--slices", "7-9", "--state", "accepted"],
                    "[8, 9] are outside 0..7")


# --- few-shot inside the study ----------------------------------------------------------------------------------
def _fewshot_study(tmp_path: Path) -> tuple[Path, Path]:
    """s0, s1 labelled; u0 without a pseudo-label; u1 with one from elsewhere (the file returned)."""
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    for i in (0, 1):
        image, labels = synthetic_case((12, 48, 48), seed=10 + i)
        sitk.WriteImage(to_image(image), str(tmp_path / f"s{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(tmp_path / f"s{i}_label.nii.gz"))
        assert main(["workspace", "add", str(ws), "--image", str(tmp_path / f"s{i}.nii.gz"),
                     "--label", str(tmp_path / f"s{i}_label.nii.gz")]) == 0
    for i in (0, 1):
        image, labels = synthetic_case((10 + i, 40, 44), seed=20 + i)
        sitk.WriteImage(to_image(image, spacing=(1.0, 1.0, 2.0)), str(tmp_path / f"u{i}.nii.gz"))
        sitk.WriteImage(to_image((labels > 0).astype(np.uint8), spacing=(1.0, 1.0, 2.0)),
                        str(tmp_path / f"u{i}_pseudo.nii.gz"))
    assert main(["workspace", "add", str(ws), "--image", str(tmp_path / "u0.nii.gz")]) == 0
    assert main(["workspace", "add", str(ws), "--image", str(tmp_path / "u1.nii.gz"),
                 "--pseudo", str(tmp_path / "u1_pseudo.nii.gz")]) == 0
    return ws, tmp_path / "u1_pseudo.nii.gz"


def _pseudolabel(ws: Path, checkpoint: Path, *extra: str) -> list[str]:
    from conftest import TINY_SIZE

    return ["pseudolabel", "--workspace", str(ws), "--checkpoint", str(checkpoint), "--model", "sam2.1-tiny",
            "--image-size", str(TINY_SIZE), "--device", "cpu", "--insertions", "2", *extra]


def _voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_pseudolabel_into_the_workspace_attaches_results_and_never_replaces_silently(tmp_path, tiny_checkpoint,
                                                                                     capsys):
    ws, elsewhere = _fewshot_study(tmp_path)
    out = ws / "pseudolabel"
    u1_before = (ws / "cases" / "u1" / "pseudo.nii.gz").read_bytes()
    capsys.readouterr()
    assert main(_pseudolabel(ws, tiny_checkpoint)) == 0
    err = capsys.readouterr().err
    assert "u1: already has a pseudo-label from elsewhere" in err and "supports: 2 labelled case(s); queries: 1 case(s)" in err
    assert "review first: u0" in err
    study = Workspace.open(ws)
    assert study.cases["u0"].has_pseudo and set(study.review("u0")) == {SliceState.UNREVIEWED}
    assert len(study.review("u0")) == 10
    np.testing.assert_array_equal(_voxels(study.file("u0", "pseudo")), _voxels(out / "u0.nii.gz"))
    assert study.table("u0").read_text() == (out / "u0.confidence.csv").read_text()
    assert coloured_pixels(out / "overview" / "u0.png") > 0
    assert (ws / "cases" / "u1" / "pseudo.nii.gz").read_bytes() == u1_before  # not replaced
    assert not (out / "u1.nii.gz").exists() and sorted(p.name for p in (out / "inputs" / "queries").iterdir()) == [
        "u0.nii.gz"]

    # a person reviews u0; a rerun resumes and keeps the review
    assert main(["workspace", "review", str(ws), "u0", "--slices", "2-3", "--state", "accepted"]) == 0
    capsys.readouterr()
    assert main(_pseudolabel(ws, tiny_checkpoint)) == 0
    assert "resuming: 1 of 1" in capsys.readouterr().err
    assert Workspace.open(ws).review("u0")[2:4] == [SliceState.ACCEPTED] * 2

    # naming a case with a pseudo-label from elsewhere needs --replace
    _one_line_error(capsys, _pseudolabel(ws, tiny_checkpoint, "--cases", "u1"), "add --replace")
    assert (ws / "cases" / "u1" / "pseudo.nii.gz").read_bytes() == u1_before
    assert main(_pseudolabel(ws, tiny_checkpoint, "--cases", "u1", "--replace")) == 0
    np.testing.assert_array_equal(_voxels(ws / "cases" / "u1" / "pseudo.nii.gz"), _voxels(out / "u1.nii.gz"))
    assert not np.array_equal(_voxels(ws / "cases" / "u1" / "pseudo.nii.gz"), _voxels(elsewhere))
    assert Workspace.open(ws).review("u0")[2:4] == [SliceState.ACCEPTED] * 2  # another case: untouched


def test_pseudolabel_into_the_workspace_refuses_what_cannot_work(tmp_path, tiny_checkpoint, capsys):
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    image_path, _ = _case(tmp_path, "u", seed=3, label=False)
    assert main(["workspace", "add", str(ws), "--image", str(image_path)]) == 0
    _one_line_error(capsys, _pseudolabel(ws, tiny_checkpoint), "no case with ground truth")
    _one_line_error(capsys, _pseudolabel(ws, tiny_checkpoint, "--axis", "coronal"), "reviewed along axial")
    _one_line_error(capsys, _pseudolabel(ws, tiny_checkpoint, "--query", str(tmp_path)), "leave out --support-images")
    labelled, label = _case(tmp_path, "s", seed=4)
    assert main(["workspace", "add", str(ws), "--image", str(labelled), "--label", str(label)]) == 0
    mine = tmp_path / "mine" / "inputs" / "queries" / "notes.nii.gz"  # a user's folder that happens to be called so
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"mine")
    capsys.readouterr()
    assert main(_pseudolabel(ws, tiny_checkpoint, "-o", str(tmp_path / "mine"))) == 1
    err = _lines(capsys)  # the line naming supports and queries, then the error
    assert err[-1].startswith("sslmedsam2: error: ") and "inputs exists and was not made by" in err[-1], err
    assert mine.read_bytes() == b"mine"
    _one_line_error(capsys, ["pseudolabel", "--query", str(tmp_path)], "give --support-images, --support-labels, -o")
    _one_line_error(capsys, ["pseudolabel", "--support-images", str(tmp_path), "--support-labels", str(tmp_path),
                             "--query", str(tmp_path), "-o", str(tmp_path / "o"), "--replace"], "go with --workspace")


# --- the review montage ------------------------------------------------------------------------------------------
CONFIDENCE = [0.9, 0.3, 0.8, 0.1, 0.6, 0.2, 1.0, 0.5]  # per slice; slice 6 is the seed


@pytest.fixture
def montage_case(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A case whose slice z is uniformly 10 (z + 1), with label 1 in a square on every slice but 7, and a table
    scoring each slice CONFIDENCE[z]."""
    volume = np.repeat((10.0 * np.arange(1, SHAPE[0] + 1))[:, None, None], SHAPE[1] * SHAPE[2], axis=1)
    volume = volume.reshape(SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[:7, 8:16, 8:16] = 1
    image_path, pseudo = tmp_path / "img.nii.gz", tmp_path / "pseudo.nii.gz"
    geometry = {"spacing": (1.0, 1.0, 2.0)}
    sitk.WriteImage(to_image(volume, **geometry), str(image_path))
    rows = [SliceConfidence(z, 1, "seed" if z == 6 else "forward", z < 7, int(labels[z].sum()), confidence=c)
            for z, c in enumerate(CONFIDENCE)]
    write_result(to_image(labels, **geometry), pseudo, rows)
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws), "--label", "liver=1"]) == 0
    assert main(["workspace", "add", str(ws), "--image", str(image_path), "--pseudo", str(pseudo), "--review-from",
                 str(pseudo.with_name("pseudo.confidence.csv")), "--id", "m"]) == 0
    return ws, volume, labels


def _png(path: Path) -> np.ndarray:
    import matplotlib.image

    return np.rint(matplotlib.image.imread(str(path))[..., :3] * 255).astype(int)


def test_show_draws_the_slices_to_review_least_confident_first(montage_case, tmp_path, capsys):
    from sslmedsam2.frames import IntensitySpec, to_uint8
    from sslmedsam2.labelmap.pictures import FILL_ALPHA, colour_of, is_our_picture
    from sslmedsam2.study.show import STATE_COLOURS, show_case
    from sslmedsam2.study.review import SliceState

    ws, volume, labels = montage_case
    grey = to_uint8(volume, IntensitySpec())[:, 0, 0]
    target = tmp_path / "m.png"
    assert main(["workspace", "show", str(ws), "m", "-o", str(target), "--max", "4"]) == 0
    assert "slices 3, 5, 1, 7 ->" in capsys.readouterr().err  # unreviewed, least confident first; 6 is a seed
    assert is_our_picture(target)
    report = show_case(Workspace.open(ws), "m", target, ws / "cases" / "m" / "pseudo.nii.gz", "pseudo",
                       ws / "cases" / "m" / "pseudo.confidence.csv", limit=4)
    png = _png(target)
    assert [b.slice for b in report.boxes] == [3, 5, 1, 7]
    for box in report.boxes:
        z = box.slice
        assert box.height == box.width == 192  # 24 x 24 voxels of 1 mm: a square panel
        corner = png[box.top + 2, box.left + 2]
        assert np.all(np.abs(corner - grey[z]) <= 1), (z, corner, grey[z])
        centre = png[box.top + box.height // 2, box.left + box.width // 2]
        expected = grey[z] if z == 7 else (1 - FILL_ALPHA) * grey[z] + FILL_ALPHA * np.array(colour_of(1, [1]))
        assert np.all(np.abs(centre - expected) <= 1), (z, centre, expected)
        frame = png[box.top - 2, box.left + box.width // 2]
        assert tuple(frame) == STATE_COLOURS[SliceState.UNREVIEWED]
    # reviewed slices leave the list; asked-for slices show their state in the frame
    assert main(["workspace", "review", str(ws), "m", "--slices", "3,5", "--state", "accepted"]) == 0
    report = show_case(Workspace.open(ws), "m", target, ws / "cases" / "m" / "pseudo.nii.gz", "pseudo",
                       ws / "cases" / "m" / "pseudo.confidence.csv", limit=3)
    assert report.slices == [1, 7, 4]
    assert main(["workspace", "show", str(ws), "m", "-o", str(target), "--slices", "5-6"]) == 0
    png = _png(target)
    report = show_case(Workspace.open(ws), "m", target, ws / "cases" / "m" / "pseudo.nii.gz", "pseudo",
                       ws / "cases" / "m" / "pseudo.confidence.csv", slices=[5, 6])
    for box, state in zip(report.boxes, (SliceState.ACCEPTED, SliceState.SEED)):
        assert tuple(png[box.top - 2, box.left + 5]) == STATE_COLOURS[state]


def test_show_refuses_to_replace_a_file_it_did_not_write(montage_case, tmp_path, capsys):
    ws, _, _ = montage_case
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n a colleague's picture")
    _one_line_error(capsys, ["workspace", "show", str(ws), "m", "-o", str(mine)], "--overwrite")
    _one_line_error(capsys, ["workspace", "show", str(ws), "m", "--layer", "label", "-o", str(tmp_path / "x.png")],
                    "has no label label map")
    assert main(["workspace", "show", str(ws), "m", "-o", str(mine), "--overwrite"]) == 0


# --- refine's pictures and bar -----------------------------------------------------------------------------------
def test_progress_plot_says_what_is_missing(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sslmedsam2.refine import plot

    def texts(fig) -> str:
        found = [t.get_text() for t in fig.texts] + [t.get_text() for ax in fig.axes for t in ax.texts]
        plt.close(fig)
        return "\n".join(found)

    nothing = texts(plot._no_round(plt, {"state": "cancelled", "round": 0, "stage": "train"}))
    assert "No refinement round has finished yet" in nothing and "again to resume" in nothing
    rounds = [{"round": 0, "mean_dice_change": 0.8, "label_change": {"liver": 0.7, "spleen": 0.9},
               "dice_change": {"c2": 0.8}, "heldout": {}, "heldout_dice": None}]
    shown = texts(plot._draw(plt, rounds, 0.99))
    assert "--eval-label" in shown and "--labels-as eval" in shown
    target = tmp_path / "progress.png"
    plot.plot_rounds([], target, 0.99, {"state": "cancelled"})
    plot.plot_rounds(rounds, target, 0.99)
    assert target.stat().st_size > 10_000


def test_the_bar_tells_the_time_left(tmp_path):
    from sslmedsam2.refine.monitor import JobMonitor, format_seconds

    start = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)

    def at(seconds: float, event: str, round_, **fields) -> dict:
        return {"time": (start + timedelta(seconds=seconds)).isoformat(), "event": event, "round": round_, **fields}

    monitor = JobMonitor(tmp_path)
    for e in [at(0, "job", None, state="running", message="started"), at(1, "stage", 0, stage="export", message=""),
              at(2, "stage", 0, stage="plan", message=""), at(10, "stage", 0, stage="train", message=""),
              at(20, "epoch", 0, epoch=1, epochs=2, loss=1.0, val_loss=1.0, pseudo_dice=[0.5], eta_s=10.0)]:
        monitor.update(e)
    assert "training ETA 6 s" in monitor.summary(3, now=start + timedelta(seconds=24))
    for e in [at(30, "stage", 0, stage="predict", message=""),
              at(30, "case", 0, stage="predict", case="c2", index=1, cases=3),
              at(40, "case", 0, stage="predict", case="c3", index=2, cases=3)]:
        monitor.update(e)
    assert monitor.describe() == "round 0, predict, case 2/3"
    assert "prediction ETA 15 s" in monitor.summary(3, now=start + timedelta(seconds=45))
    monitor.update(at(60, "stage", 0, stage="score", message=""))
    monitor.update(at(61, "round", 0, mean_dice_change=0.5, converged=False))
    monitor.update(at(62, "stage", 1, stage="export", message=""))
    # round 0 took 60 s (export to its end): this one has run 3 s of its 60, one more round follows
    eta = monitor.eta_s(3, now=start + timedelta(seconds=65))
    assert eta is not None and math.isclose(eta, 2 * 60 - 3, abs_tol=1.0)
    assert "1/3 rounds done" in monitor.summary(3, now=start + timedelta(seconds=65))
    assert format_seconds(3725) == "1 h 2 min" and format_seconds(125) == "2 min 5 s"
