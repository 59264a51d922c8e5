"""Cohorts as cluster array jobs, on the CPU and without a scheduler: shards from the scheduler's array variables,
shards run in parallel processes as a scheduler would, a shard killed mid-case, `cohort status` and its rerun
specification, the weight cache under concurrent first use, and `refine --gpus` without GPUs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import PAYLOAD, TINY_SIZE, coloured_pixels, synthetic_case, table_lines, to_image

from sslmedsam2.cli import main
from sslmedsam2.cohort.shards import Shard, array_spec, resolve_shard, shard_of
from sslmedsam2.cohort.status import STATUS_DIR, cohort_status, read_records
from sslmedsam2.errors import UserError


def _slurm(task: int, first: int = 1, last: int = 3, count: int | None = None, step: int = 1) -> dict[str, str]:
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_MAX": str(last),
            "SLURM_ARRAY_TASK_COUNT": str(last - first + 1 if count is None else count),
            "SLURM_ARRAY_TASK_STEP": str(step)}


# --- shards --------------------------------------------------------------------------------------------------------
def test_shards_from_the_schedulers_array_variables():
    assert resolve_shard(None, None, _slurm(2)) == Shard(2, 3, "SLURM_ARRAY_TASK_ID=2", 1)
    assert resolve_shard(None, None, _slurm(0, 0, 3)) == Shard(1, 4, "SLURM_ARRAY_TASK_ID=0", 0)  # --array=0-3
    # a rerun of some tasks (--array=3,7: count 2) keeps the split cohort.json recorded
    assert resolve_shard(None, (10, 1), _slurm(7, 3, 7, count=2)) == Shard(7, 10, "SLURM_ARRAY_TASK_ID=7", 1)
    assert resolve_shard(None, (10, 0), _slurm(3, 3, 3)) == Shard(4, 10, "SLURM_ARRAY_TASK_ID=3", 0)
    assert resolve_shard((1, 2), (10, 1), _slurm(7)).index == 1  # an explicit --shard always wins
    assert resolve_shard(None, None, {}).count == 1  # no array job: every case
    assert resolve_shard(None, None, {"LSB_JOBINDEX": "2", "LSB_JOBINDEX_END": "4"}) == Shard(2, 4, "LSB_JOBINDEX=2", 1)
    assert resolve_shard(None, None, {"LSB_JOBINDEX": "0"}).count == 1  # LSF's value outside an array
    sge = {"SGE_TASK_ID": "3", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "5", "SGE_TASK_STEPSIZE": "1"}
    assert resolve_shard(None, None, sge) == Shard(3, 5, "SGE_TASK_ID=3", 1)
    assert resolve_shard(None, None, {"SGE_TASK_ID": "undefined"}).count == 1
    assert resolve_shard(None, (4, 1), {"PBS_ARRAY_INDEX": "2"}) == Shard(2, 4, "PBS_ARRAY_INDEX=2", 1)
    assert resolve_shard(None, (4, 1), {"PBS_ARRAYID": "4"}) == Shard(4, 4, "PBS_ARRAYID=4", 1)
    # set but inconsistent, or not enough to know N: one line, never the whole cohort in every task
    for env, recorded, fragment in (
            (_slurm(3, 3, 7, count=2), None, "does not say how many shards"),  # a subset, first run
            (_slurm(5, 1, 3), None, "outside its own array"),
            (_slurm(2, 1, 9, step=4), None, "step 4"),
            (_slurm(11, 1, 11), (10, 1), "split into 10 shards"),
            (_slurm(2, 1, 12), (10, 1), "an array of 12 tasks"),
            ({"SLURM_ARRAY_TASK_ID": "x"}, None, "not a number"),
            ({"PBS_ARRAY_INDEX": "2"}, None, "--shard $PBS_ARRAY_INDEX/N")):
        with pytest.raises(UserError, match=re.escape(fragment)):
            resolve_shard(None, recorded, env)
    assert array_spec([7, 1, 2, 3, 9, 10]) == "1-3,7,9-10" and array_spec([3, 7]) == "3,7"


def test_shards_are_disjoint_and_cover_the_sorted_cases():
    paths = [Path("b") / f"case{i:02d}.nii.gz" for i in range(6)] + [Path("a") / f"zz{i}.nii.gz" for i in range(5)]
    for count in (1, 2, 3, 4, 11, 12):
        shares = [shard_of(paths, (i, count)) for i in range(1, count + 1)]
        flat = [p for share in shares for p in share]
        assert sorted(flat) == sorted(paths) and len(flat) == len(set(flat))
    assert [p.name for p in shard_of(paths, (1, 4))] == ["case00.nii.gz", "case04.nii.gz", "zz2.nii.gz"]


def test_list_files_and_their_mistakes(tmp_path):
    from sslmedsam2.cohort.cases import list_cases

    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.nii.gz").write_bytes(b"")
    (tmp_path / "x" / "b.nrrd").write_bytes(b"")
    listing = tmp_path / "cases.txt"
    listing.write_text(f"# the cohort\nx/a.nii.gz\n\n{tmp_path / 'x' / 'b.nrrd'}\n")
    assert list_cases(listing) == [tmp_path / "x" / "a.nii.gz", tmp_path / "x" / "b.nrrd"]
    listing.write_text("x/a.nii.gz\ny/a.nii.gz\n")
    with pytest.raises(UserError, match="two inputs named a.nii.gz"):
        list_cases(listing)
    listing.write_text("x/a.nii.gz\nx/missing.nii.gz\n")
    with pytest.raises(UserError, match="line 2"):
        list_cases(listing)
    with pytest.raises(UserError, match="is an image"):
        list_cases(tmp_path / "x" / "a.nii.gz")


# --- pseudolabel shards as array tasks -----------------------------------------------------------------------------
def _fewshot_cohort(root: Path, queries: int) -> dict[str, Path]:
    folders = {name: root / name for name in ("si", "sl", "q", "out")}
    for name in ("si", "sl", "q"):
        folders[name].mkdir()
    image, labels = synthetic_case((8, 32, 32), seed=10)
    sitk.WriteImage(to_image(image), str(folders["si"] / "support0.nii.gz"))
    sitk.WriteImage(to_image(labels), str(folders["sl"] / "support0.nii.gz"))
    for i in range(queries):
        image, _ = synthetic_case((6 + i % 3, 32, 32), seed=20 + i)
        sitk.WriteImage(to_image(image), str(folders["q"] / f"query{i}.nii.gz"))
    return folders


def _run(argv: list[str], env: dict[str, str] | None = None, stderr=subprocess.PIPE) -> subprocess.Popen:
    """The command in its own process, as a scheduler starts it (`env`: its array variables)."""
    code = f"import sys; from sslmedsam2.cli import main; sys.exit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def test_three_array_tasks_in_parallel_do_every_case_exactly_once(tmp_path, tiny_checkpoint, capsys):
    folders = _fewshot_cohort(tmp_path, queries=7)
    argv = ["pseudolabel", "--support-images", str(folders["si"]), "--support-labels", str(folders["sl"]),
            "--query", str(folders["q"]), "-o", str(folders["out"]), "--checkpoint", str(tiny_checkpoint),
            "--model", "sam2.1-tiny", "--image-size", str(TINY_SIZE), "--device", "cpu", "--insertions", "1"]
    jobs = [_run(argv, _slurm(task)) for task in (1, 2, 3)]  # no --shard: as sbatch starts them
    for job in jobs:
        _, err = job.communicate(timeout=400)
        assert job.returncode == 0, err
    names = sorted(p.name for p in folders["q"].iterdir())
    done = [r for r in read_records(folders["out"]) if r["state"] == "done"]
    assert sorted(r["case"] for r in done) == names, "a case was done twice, or not at all"
    for task in (1, 2, 3):
        mine = {p.name for p in shard_of(list(folders["q"].iterdir()), (task, 3))}
        assert {r["case"] for r in done if r["shard"] == task} == mine and all(r["shards"] == 3 for r in done)
    for name in names:
        assert (folders["out"] / name).is_file() and (folders["out"] / name.replace(".nii.gz", ".case.json")).is_file()
    assert len({line.split(",")[1] for line in table_lines(folders["out"] / "ranking.csv")[1:]}) == 7
    status = cohort_status(folders["out"])
    assert (status.count("done"), status.shards, status.rerun_array()) == (7, 3, "")
    capsys.readouterr()
    assert main(["cohort", "status", str(folders["out"])]) == 0
    out = capsys.readouterr().out
    assert "7 done, 0 failed, 0 running, 0 missing" in out and "nothing to rerun" in out


# --- predict --input: a killed shard, failed and missing cases, cohort status ----------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An axial workspace after one --quick 2d round, and six new images, one of them damaged (its header is
    intact, its voxels cut short): a6 files, sorted a0..a5, so that shard I of 3 takes a(I-1) and a(I+2)."""
    root = tmp_path_factory.mktemp("cohort")
    ws = root / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    for i in range(3):
        image, labels = synthetic_case((8, 32, 32), seed=i)
        sitk.WriteImage(to_image(image), str(root / f"c{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(root / f"c{i}_gt.nii.gz"))
        kind = "--label" if i < 2 else "--pseudo"
        assert main(["workspace", "add", str(ws), "--image", str(root / f"c{i}.nii.gz"), kind,
                     str(root / f"c{i}_gt.nii.gz")]) == 0
    assert main(["refine", str(ws), "--quick", "--device", "cpu", "--rounds", "1", "--configuration", "2d"]) == 0
    new = root / "new"
    new.mkdir()
    for i in range(6):
        image, _ = synthetic_case((8, 32, 32), seed=30 + i)
        sitk.WriteImage(to_image(image), str(new / f"a{i}.nii"), False)
    damaged = new / "a3.nii"
    damaged.write_bytes(damaged.read_bytes()[:-2000])
    return ws


def _predict_argv(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["predict", str(ws), "--input", str(ws.parent / "new"), "-o", str(out), "--device", "cpu", *extra]


def _wait_for_done(out: Path, job: subprocess.Popen, count: int = 1, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        if (out / STATUS_DIR).is_dir() and sum(r["state"] == "done" for r in read_records(out)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no case finished in time (exit {job.poll()})")


def test_killed_shard_resumes_and_status_lists_what_to_rerun(trained, tmp_path, capsys):
    out = tmp_path / "pred"
    job = _run(_predict_argv(trained, out), _slurm(2), stderr=subprocess.DEVNULL)  # shard 2: a1, a4
    _wait_for_done(out, job)
    job.kill()  # SIGKILL in the middle of a4 (or just after it): no word, no clean-up
    job.wait()
    first = out / "a1.nii"
    stamp = first.stat().st_mtime_ns
    status = {c.case: c for c in cohort_status(out).cases}
    assert status["a1.nii"].state == "done"
    if status["a4.nii"].state != "done":
        assert status["a4.nii"].state == "failed" and "killed" in status["a4.nii"].reason
    assert all(status[f"a{i}.nii"].state == "missing" for i in (0, 2, 3, 5))

    # the same task again: a1 is not redone
    assert main(_predict_argv(trained, out, "--shard", "2/3")) == 0
    assert first.stat().st_mtime_ns == stamp, "a finished case was predicted again"
    assert not list(out.glob(".*"))
    # shard 1 (a0, a3): the damaged a3 fails with its reason, a0 is done, the command says so in one line
    capsys.readouterr()
    assert main(_predict_argv(trained, out, "--shard", "1/3")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "1 of 2 cases of this shard failed (a3.nii:" in err[-1] and "cohort status" in err[-1]
    # shard 3 never ran: a2 and a5 are missing; shard 1 is to rerun for a3
    assert main(["cohort", "status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 done, 1 failed, 0 running, 2 missing" in text
    assert re.search(r"a3\.nii  \(shard 1\): .+", text) and "a2.nii  (shard 3): never started" in text
    assert text.strip().splitlines()[-1] == "--array=1,3"
    assert main(["cohort", "status", str(out), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["rerun_shards"] == [1, 3] and listing["command"] == "predict"
    assert coloured_pixels(out / "overview" / "a1.png") > 0  # the prediction drawn in colour
    record = json.loads((out / "a1.case.json").read_text())
    assert record["model"]["round"] == 0 and len(record["model"]["checkpoint_sha256"]) == 64
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(first)))
    assert labels.shape == (8, 32, 32) and set(np.unique(labels)) <= {0, 1, 2}


def test_an_interrupt_says_what_was_kept_and_how_to_resume(trained, tmp_path):
    out = tmp_path / "pred"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as handle:
        job = _run(_predict_argv(trained, out, "--shard", "3/3"), stderr=handle)  # a2, a5
        _wait_for_done(out, job)
        job.send_signal(signal.SIGINT)
        job.wait(timeout=120)
    err = log.read_text()
    assert job.returncode == 130, err
    last = err.strip().splitlines()[-1]
    finished = int(re.search(r"interrupted; (\d) of 2 cases of this shard are finished and kept in", last).group(1))
    assert "rerun the same command to resume" in last and "no output was written" not in last
    assert finished == cohort_status(out).count("done") >= 1


def test_a_pseudolabel_folder_is_not_a_predict_folder_and_outputs_stay_out_of_inputs(trained, tmp_path, capsys):
    out = tmp_path / "pseudo"
    out.mkdir()
    (out / "cohort.json").write_text(json.dumps({"sslmedsam2": "cohort", "command": "pseudolabel", "cases": []}))
    assert main(_predict_argv(trained, out)) == 1
    assert "holds the results of `pseudolabel`" in capsys.readouterr().err
    for bad in (trained.parent / "new", trained / "predictions"):
        assert main(_predict_argv(trained, bad)) == 1
        assert "input" in capsys.readouterr().err
    assert main(["predict", str(trained), "-o", str(out)]) == 1
    assert "give one IMAGE, or --input" in capsys.readouterr().err


# --- refine --gpus -------------------------------------------------------------------------------------------------
def test_gpus_is_refused_without_gpus(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["workspace", "init", str(ws)]) == 0
    for extra, fragment in ((["--gpus", "2"], "no CUDA GPU"), (["--gpus", "all"], "no CUDA GPU"),
                            (["--gpus", "two"], "a number of GPUs"), (["--gpus", "1", "--device", "cpu"], "--device cpu")):
        capsys.readouterr()
        assert main(["refine", str(ws), *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sslmedsam2: error: ") and fragment in err[0], err
    assert not (ws / "refine").exists()


def test_gpus_reach_the_training_and_spread_the_predictions(trained, tmp_path, monkeypatch):
    """The plumbing, on a machine without GPUs: --gpus all with two (pretended) GPUs reaches nnU-Net's training,
    and the round's predictions run as two processes, one shard each (here on the CPU)."""
    from sslmedsam2.labelmap.confidence import pair_state
    from sslmedsam2.refine import nnunet
    from sslmedsam2.refine.rounds import RefineJob, RefineOptions
    from sslmedsam2.study.workspace import Workspace

    assert nnunet.gpu_environments(2, "3,5") == [{"CUDA_VISIBLE_DEVICES": "3"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    assert nnunet.gpu_environments(2, "") == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    with pytest.raises(UserError, match="shows only 1"):
        nnunet.gpu_environments(2, "7")

    monkeypatch.setattr(nnunet, "visible_gpus", lambda: 2)
    assert RefineOptions(gpus="all").gpu_count() == 2 and RefineOptions(gpus="1").gpu_count() == 1
    with pytest.raises(UserError, match="shows 2 GPU"):
        RefineOptions(gpus="3").gpu_count()
    seen = {}

    def train(*args, **kwargs):
        seen.update(kwargs)
        raise UserError("stopped here by the test")

    ws = Workspace.open(trained)
    nnunet.use_folders(ws.refine_dir / "nnunet", create=False)
    model = nnunet.model_folder(0, "2d")
    real_train, real_train_ddp = nnunet.train, nnunet.train_ddp
    monkeypatch.setattr(nnunet, "plan_and_preprocess", lambda *a, **k: None)
    monkeypatch.setattr(nnunet, "train", train)
    copy = tmp_path / "ws"
    subprocess.run(["cp", "-a", str(trained), str(copy)], check=True)
    with pytest.raises(UserError, match="stopped here"):
        RefineJob(Workspace.open(copy), RefineOptions.quick(gpus="all", configuration="2d", rounds=2,
                                                            convergence=1.0)).run()
    assert seen["gpus"] == 2 and seen["log_path"] == copy / "refine" / "nnunet.log"
    # train(gpus=2) hands an unfinished round to nnU-Net's DDP training (not run: no GPUs), a finished one not
    ddp = []
    monkeypatch.setattr(nnunet, "train_ddp", lambda gpus, job, on_epoch, should_stop: ddp.append((gpus, job)))
    for round_ in (0, 1):
        real_train(round_, "2d", "all", "cuda", 2, 3, 1, lambda e: None, lambda: False, gpus=2, log_path=tmp_path / "log")
    assert [(g, job["round"], job["epochs"], job["log"]) for g, job in ddp] == [(2, 1, 2, str(tmp_path / "log"))]
    nnunet.use_folders(copy / "refine" / "nnunet", create=False)
    with pytest.raises(UserError, match="splits its batch of"):  # checked before any process starts
        real_train_ddp(4096, {"round": 0, "configuration": "2d"}, lambda e: None, lambda: False)

    # the predictions of a round over two "GPUs": two processes, each a shard
    images = sorted((trained.parent / "new").glob("a[0125].nii"))
    outputs = [tmp_path / "spread" / f"{p.name[:-4]}.nii.gz" for p in images]
    nnunet.use_folders(ws.refine_dir / "nnunet", create=False)
    assert model.is_dir()
    nnunet.predict_on_gpus(2, 0, "2d", "all", images, outputs, confidence_axis="axial", device="cpu",
                           mirroring=False, step=1.0)
    assert all(pair_state(o) == "complete" for o in outputs)


# --- the weight cache ----------------------------------------------------------------------------------------------
def test_concurrent_first_use_of_the_weight_cache_downloads_once(server, tmp_path):
    httpd, handler = server

    def slow_get(self):  # slow enough that every process asks while the first download runs
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        for start in range(0, len(self.body), 1 << 16):
            self.wfile.write(self.body[start:start + (1 << 16)])
            time.sleep(0.1)

    handler.do_GET = slow_get
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    code = ("import sys\nfrom dataclasses import replace\nfrom sslmedsam2.models import get_model\n"
            "from sslmedsam2.models.cache import ensure_weights\n"
            f"spec = replace(get_model('sam2.1-tiny'), sha256='{digest}', size_bytes={len(PAYLOAD)})\n"
            "print(ensure_weights(spec, log=lambda m: print(m, file=sys.stderr)))\n")
    jobs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             encoding="utf-8", errors="replace")
            for _ in range(4)]
    results = [job.communicate(timeout=120) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), results
    paths = {Path(out.strip()) for out, _ in results}
    assert len(paths) == 1 and next(iter(paths)).read_bytes() == PAYLOAD
    assert httpd.requests == 1, f"{httpd.requests} downloads"
    assert any("another process is downloading" in err for _, err in results)
    cache = next(iter(paths)).parent
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [next(iter(paths)).name]
