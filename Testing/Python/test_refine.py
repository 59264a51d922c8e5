"""The study workspace and nnU-Net refinement rounds, on a tiny synthetic study with a tiny schedule."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import coloured_pixels, synthetic_case, to_image
from scipy import ndimage

from sslmedsam2.cli import main
from sslmedsam2.refine.events import read_events
from sslmedsam2.refine.export import export_round
from sslmedsam2.study.review import SliceState
from sslmedsam2.study.workspace import Workspace

QUICK = ["--quick", "--device", "cpu"]


def _inputs(folder: Path, cases: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        image, labels = synthetic_case((12, 40, 40), seed=i)
        sitk.WriteImage(to_image(image), str(folder / f"c{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(folder / f"c{i}_gt.nii.gz"))
        rough = labels.copy()
        rough[~ndimage.binary_erosion(labels > 0)] = 0
        sitk.WriteImage(to_image(rough), str(folder / f"c{i}_pseudo.nii.gz"))


@pytest.fixture
def study(tmp_path) -> Path:
    """2 cases with ground truth, 2 with pseudo-labels (and held-out labels to score rounds)."""
    inputs, ws = tmp_path / "in", tmp_path / "ws"
    _inputs(inputs)
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    for i in (0, 1):
        assert main(["workspace", "add", str(ws), "--image", str(inputs / f"c{i}.nii.gz"),
                     "--label", str(inputs / f"c{i}_gt.nii.gz")]) == 0
    for i in (2, 3):
        assert main(["workspace", "add", str(ws), "--image", str(inputs / f"c{i}.nii.gz"),
                     "--pseudo", str(inputs / f"c{i}_pseudo.nii.gz"), "--eval-label", str(inputs / f"c{i}_gt.nii.gz")]) == 0
    return ws


def _events(ws: Path) -> list[dict]:
    return read_events(ws / "refine" / "events.jsonl")[0]


def _status(ws: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["workspace", "status", str(ws), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


EVENT_FIELDS = {
    "job": {"state", "message"},
    "stage": {"stage", "message"},
    "epoch": {"epoch", "epochs", "loss", "val_loss", "pseudo_dice", "eta_s"},
    "case": {"stage", "case", "index", "cases"},
    "round": {"mean_dice_change", "dice_change", "label_change", "heldout_dice", "label_heldout", "converged"},
    "error": {"message"},
}


def _check_schema(events: list[dict]) -> None:
    for e in events:
        assert {"time", "event", "round"} <= set(e), e
        assert EVENT_FIELDS[e["event"]] <= set(e), e
        if e["event"] == "job":
            assert e["state"] in ("running", "finished", "converged", "cancelled", "failed")
        if e["event"] == "stage":
            assert e["stage"] in ("export", "plan", "train", "predict", "score")


def test_two_rounds_end_to_end_then_predict(study, capsys, tmp_path):
    before = {p: p.read_bytes() for p in (study / "cases").rglob("*") if p.is_file()}
    assert main(["refine", str(study), *QUICK, "--rounds", "2", "--convergence", "1.0"]) == 0
    events = _events(study)
    _check_schema(events)
    assert [e["state"] for e in events if e["event"] == "job"] == ["running", "finished"]
    rounds = [e for e in events if e["event"] == "round"]
    assert [e["round"] for e in rounds] == [0, 1]
    assert all(0 <= e["mean_dice_change"] <= 1 and e["heldout_dice"] is not None for e in rounds)
    epochs = [e for e in events if e["event"] == "epoch" and e["round"] == 0]
    assert [e["epoch"] for e in epochs] == [1, 2] and len(epochs[0]["pseudo_dice"]) == 2
    assert all(set(e["label_change"]) == {"a", "b"} and set(e["label_heldout"]) == {"a", "b"} for e in rounds)
    cases = [(e["round"], e["case"], e["index"], e["cases"]) for e in events if e["event"] == "case"]
    assert cases == [(0, "c2", 1, 2), (0, "c3", 2, 2), (1, "c2", 1, 2), (1, "c3", 2, 2)]
    status = _status(study, capsys)
    assert status["refine"]["state"] == "finished" and status["refine"]["round"] == 1
    assert (study / "refine" / "progress.png").stat().st_size > 1000
    from sslmedsam2.labelmap.pictures import is_our_picture

    for r in (0, 1):  # a picture per case and round; nnU-Net's confidence table beside each prediction
        folder = study / "refine" / "rounds" / f"round_{r:02d}"
        assert all(is_our_picture(folder / "overview" / f"{c}.png") for c in ("c2", "c3"))
        assert all((folder / "predicted" / f"{c}.confidence.csv").is_file() for c in ("c2", "c3"))
    outputs = status["refine"]["outputs"]
    assert outputs["pseudo_labels"] == str(study / "refine" / "rounds" / "round_01" / "pseudo")
    assert outputs["model"]["round"] == 1 and Path(outputs["model"]["checkpoint"]).is_file()
    capsys.readouterr()
    assert main(["workspace", "status", str(study)]) == 0
    text = capsys.readouterr().out
    assert "current pseudo-labels: " + str(study / "refine" / "rounds" / "round_01" / "pseudo") in text
    assert "current model: round 1" in text and "progress plot: " in text
    # no job writes ground truth, pseudo-labels or review state
    assert before == {p: p.read_bytes() for p in (study / "cases").rglob("*") if p.is_file()}
    out = tmp_path / "predicted.nrrd"
    assert main(["predict", str(study), str(tmp_path / "in" / "c3.nii.gz"), "-o", str(out), "--device", "cpu"]) == 0
    image, result = sitk.ReadImage(str(tmp_path / "in" / "c3.nii.gz")), sitk.ReadImage(str(out))
    assert result.GetSize() == image.GetSize() and result.GetOrigin() == image.GetOrigin()
    assert set(np.unique(sitk.GetArrayFromImage(result))) <= {0, 1, 2}
    assert coloured_pixels(tmp_path / "predicted.overview.png") > 0


def test_convergence_stops_early(study, capsys):
    (study / "refine").mkdir()
    (study / "refine" / "stop").write_text("left by a job that was killed before it saw it\n")
    assert main(["refine", str(study), *QUICK, "--rounds", "3", "--convergence", "0.01"]) == 0
    assert not (study / "refine" / "stop").exists(), "a stale stop request must not cancel a new job"
    events = _events(study)
    assert [e["round"] for e in events if e["event"] == "round"] == [0]
    assert events[-1]["event"] == "job" and events[-1]["state"] == "converged"
    assert _status(study, capsys)["refine"]["state"] == "converged"


def test_ignore_label_export_marks_distrusted_slices(study, tmp_path):
    ws = Workspace.open(study)
    states = ws.review("c2")
    states[3], states[4], states[7] = SliceState.REJECTED, SliceState.REJECTED, SliceState.ACCEPTED
    ws.set_review("c2", states)
    pseudo = {c: ws.file(c, "pseudo") for c in ("c2", "c3")}
    for policy, ignored_c2 in (("rejected", {3, 4}), ("unreviewed", set(range(12)) - {7}), ("none", set())):
        raw = tmp_path / f"raw_{policy}"
        assert export_round(ws, raw, pseudo, policy) == 4
        dataset = json.loads((raw / "dataset.json").read_text())
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / "c2.nii.gz")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / "c0.nii.gz")))
        marked = {z for z in range(label.shape[0]) if (label[z] == 3).all()}
        assert marked == ignored_c2
        assert 3 not in truth, "ground truth is never masked"
        if ignored_c2:
            assert dataset["labels"] == {"background": 0, "a": 1, "b": 2, "ignore": 3}
        else:
            assert "ignore" not in dataset["labels"]
        assert dataset["channel_names"] == {"0": "MRI"} and dataset["file_ending"] == ".nii.gz"


def _start(ws: Path, *extra: str) -> subprocess.Popen:
    code = f"import sys; from sslmedsam2.cli import main; sys.exit(main({['refine', str(ws), *QUICK, *extra]!r}))"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace")


def _wait_for(ws: Path, predicate, job: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        if (ws / "refine" / "events.jsonl").exists() and predicate(_events(ws)):
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out or the job ended (exit {job.poll()})")


STOP_BOUND_S = 15.0  # from the signal to the process's end; an epoch of the schedule below lasts longer


def _stop_within_bound(study: Path, job: subprocess.Popen, signum: int) -> str:
    started = time.time()
    job.send_signal(signum)
    code = job.wait(timeout=120)
    seconds = time.time() - started
    err = job.stderr.read()
    assert code == 3, err
    assert seconds < STOP_BOUND_S, f"stopped {seconds:.1f} s after {signal.Signals(signum).name}"
    return err


def test_sigterm_and_sigint_stop_within_seconds_and_the_job_resumes(study, capsys):
    """A stop signal unwinds the job from inside an epoch (no wait for its end), says how to resume, and the
    next run continues the training from nnU-Net's last saved epoch."""
    schedule = ["--rounds", "1", "--epochs", "2", "--iterations", "8", "--convergence", "1.0"]
    job = _start(study, *schedule)
    _wait_for(study, lambda ev: any(e["event"] == "epoch" for e in ev), job)
    time.sleep(2.0)  # inside epoch 2
    err = _stop_within_bound(study, job, signal.SIGTERM)
    assert "refine cancelled (stopped by SIGTERM in round 0 (train)" in err, err
    assert "to resume: sslmedsam2 refine " in err and "--iterations 8" in err, err
    last = _events(study)[-1]
    assert last["event"] == "job" and last["state"] == "cancelled" and "run refine again to resume" in last["message"]
    assert _status(study, capsys)["refine"]["state"] == "cancelled"
    assert [e["epoch"] for e in _events(study) if e["event"] == "epoch"] == [1], "it waited for the epoch's end"
    assert (study / "refine" / "progress.png").is_file()  # a note that no round has finished
    job = _start(study, *schedule)  # Ctrl-C while it starts again
    _wait_for(study, lambda ev: ev[-1]["event"] == "stage" and ev[-1]["stage"] == "train", job)
    err = _stop_within_bound(study, job, signal.SIGINT)
    assert "stopped by SIGINT" in err, err
    assert main(["refine", str(study), *QUICK, *schedule]) == 0
    epochs = [e["epoch"] for e in _events(study) if e["event"] == "epoch" and e["round"] == 0]
    assert epochs == [1, 2], "training did not continue from nnU-Net's checkpoint"
    assert _status(study, capsys)["refine"]["state"] == "finished"


def test_sigkill_at_a_random_point_then_resume(study, capsys):
    delay = random.Random(os.getpid()).uniform(3.0, 25.0)
    job = _start(study, "--rounds", "2", "--convergence", "1.0")
    time.sleep(delay)
    job.kill()
    job.wait()
    if _events(study) and _events(study)[-1].get("state") != "finished":
        assert _status(study, capsys)["refine"]["state"] in ("failed", "running", "not started")
    assert main(["refine", str(study), *QUICK, "--rounds", "2", "--convergence", "1.0"]) == 0, f"killed after {delay:.1f} s"
    status = _status(study, capsys)["refine"]
    assert status["state"] == "finished" and [r["round"] for r in status["rounds"]] == [0, 1]
    for r in (0, 1):
        folder = study / "refine" / "rounds" / f"round_{r:02d}"
        assert (folder / "round.json").is_file()
        assert sorted(p.name for p in (folder / "pseudo").iterdir()) == ["c2.nii.gz", "c3.nii.gz"]
    assert not list((study / "refine" / "rounds").rglob(".*tmp*"))


def _expect(capsys, argv, fragment):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sslmedsam2: error: ") and fragment in err[-1], err


def test_bad_inputs_change_nothing(study, tmp_path, capsys):
    index = study / "workspace.json"
    original = index.read_text()
    # label values missing from the dataset's labels
    odd = tmp_path / "odd.nii.gz"
    _, labels = synthetic_case((12, 40, 40), seed=0)
    labels[labels == 2] = 7
    sitk.WriteImage(to_image(labels), str(odd))
    _expect(capsys, ["workspace", "add", str(study), "--image", str(tmp_path / "in" / "c0.nii.gz"), "--label", str(odd),
                     "--id", "odd"], "[7]")
    assert index.read_text() == original and not (study / "cases" / "odd").exists()
    # zero cases with ground truth
    empty = tmp_path / "nogt"
    assert main(["workspace", "init", str(empty)]) == 0
    assert main(["workspace", "add", str(empty), "--image", str(tmp_path / "in" / "c2.nii.gz"),
                 "--pseudo", str(tmp_path / "in" / "c2_pseudo.nii.gz")]) == 0
    _expect(capsys, ["refine", str(empty), *QUICK], "no case has ground truth")
    assert not (empty / "refine").exists()
    # a case without image
    (study / "cases" / "c3" / "image.nii.gz").unlink()
    _expect(capsys, ["refine", str(study), *QUICK], "case c3 has no image")
    capsys.readouterr()
    assert main(["workspace", "status", str(study)]) == 0  # status lists the case and what it misses
    assert "files missing: image.nii.gz" in capsys.readouterr().out
    # a newer schema
    data = json.loads(original)
    data["schema_version"] = 99
    index.write_text(json.dumps(data))
    _expect(capsys, ["refine", str(study), *QUICK], "schema version 99")
    assert not (study / "refine").exists()


def test_cancel_and_follow_commands(study, capsys):
    job = _start(study, "--rounds", "1", "--epochs", "4", "--convergence", "1.0")
    _wait_for(study, lambda ev: any(e["event"] == "epoch" for e in ev), job)
    assert main(["refine", str(study), "--cancel"]) == 0
    assert (study / "refine" / "stop").is_file()  # a file the job watches: the same gentle stop on Windows
    assert job.wait(timeout=120) == 3
    assert _events(study)[-1]["state"] == "cancelled" and not (study / "refine" / "stop").exists()
    _expect(capsys, ["refine", str(study), "--cancel"], "no refine job is running")
    job = _start(study, "--rounds", "1", "--epochs", "4", "--convergence", "1.0")
    _wait_for(study, lambda ev: ev[-1]["event"] != "job" or ev[-1]["state"] == "running", job)
    capsys.readouterr()
    assert main(["refine", str(study), "--follow"]) == 0  # returns when the job has finished
    assert job.wait(timeout=60) == 0
    err = capsys.readouterr().err
    assert "refine finished" in err
    # the run's events from its start, in the order they happened: one line each for the start, stages, round, end
    lines = [line.split(" ", 1)[1] for line in err.splitlines() if line[:2].isdigit() and line[2:3] == ":"]
    assert lines[0] == "refine running: resumed"
    assert [line for line in lines if line.startswith("round 0: ")] == [
        "round 0: training", "round 0: predicting 2 cases", "round 0: comparing with the previous pseudo-labels"]
    assert lines[-2].startswith("round 0 done: ") and lines[-1] == "refine finished"


def test_monitor_reads_only_complete_lines_and_the_latest_run(tmp_path):
    from sslmedsam2.refine.events import EventLog
    from sslmedsam2.refine.monitor import JobMonitor

    log = EventLog(tmp_path)
    log.emit("job", None, state="running", message="started")
    log.emit("job", 0, state="cancelled", message="")
    log.emit("job", 0, state="running", message="resumed")
    log.emit("stage", 0, stage="train", message="training")
    log.emit("epoch", 0, epoch=5, epochs=10, loss=0.5, val_loss=0.6, pseudo_dice=[0.5], eta_s=10.0)
    with open(log.path, "a") as handle:
        handle.write('{"time": "2026-01-01", "event": "epo')  # a line still being written
    monitor = JobMonitor(tmp_path)
    monitor.attach_to_latest_run()
    events = monitor.poll()
    assert [e["event"] for e in events] == ["job", "stage", "epoch"]
    assert not monitor.finished and monitor.state == "running"
    assert monitor.describe() == "round 0, train, epoch 5/10, pseudo-Dice 0.50"
    assert 0.0 < monitor.fraction(rounds=2) < 0.5
    with open(log.path, "a") as handle:
        handle.write('ch", "round": 0, "epoch": 6, "epochs": 10}\n')
    assert [e["epoch"] for e in monitor.poll()] == [6]
    log.emit("job", 1, state="converged", message="")
    monitor.poll()
    assert monitor.finished and monitor.fraction(rounds=2) == 1.0


def test_fold_needs_five_training_cases_and_is_checked_up_front(study, capsys):
    # 4 training cases: nnU-Net's 5-fold split would fail only after planning and preprocessing
    _expect(capsys, ["refine", str(study), *QUICK, "--fold", "0"], "at least 5 training cases")
    _expect(capsys, ["refine", str(study), *QUICK, "--fold", "7"], "a number 0-4")
    assert not (study / "refine").exists()


def _hold_lock(refine: Path) -> subprocess.Popen:
    code = ("import sys, time\nfrom sslmedsam2.refine.events import job_lock\n"
            "lock = job_lock(sys.argv[1])\nlock.acquire()\nprint('held', flush=True)\ntime.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(refine)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_liveness_is_the_job_lock_not_a_pid(study, capsys):
    """os.kill(pid, 0) is no liveness check on Windows and a pid can be reused: a job is running while it holds
    WS/refine/.lock, which the OS releases however the process ends."""
    from sslmedsam2.refine.events import EventLog, job_running

    refine = study / "refine"
    refine.mkdir()
    EventLog(refine).write_status({"state": "running", "round": 0, "stage": "train", "pid": os.getpid()})
    assert not job_running(refine)
    assert _status(study, capsys)["refine"]["state"] == "failed"  # a live pid that is no job
    _expect(capsys, ["refine", str(study), "--cancel"], "no refine job is running")
    holder = _hold_lock(refine)
    try:
        assert job_running(refine)
        assert _status(study, capsys)["refine"]["state"] == "running"
        assert main(["refine", str(study), "--cancel"]) == 0
        assert (refine / "stop").is_file()
    finally:
        holder.kill()
        holder.wait()
    assert not job_running(refine)
    assert _status(study, capsys)["refine"]["state"] == "failed"


def test_refine_modules_import_without_fcntl():
    """Windows has no fcntl: the job, its events and the monitor must import without it."""
    code = ("import sys\n"
            "class NoFcntl:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'fcntl':\n"
            "            raise ImportError('no fcntl here, as on Windows')\n"
            "sys.modules.pop('fcntl', None)\n"
            "sys.meta_path.insert(0, NoFcntl())\n"
            "import sslmedsam2.refine.rounds, sslmedsam2.refine.events, sslmedsam2.refine.monitor, sslmedsam2.cli\n"
            "print('fcntl' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
