"""No file in a workspace can run code: nnU-Net checkpoints are loaded only with the digest their refine run
recorded and weights-only, and plans.json may name only allow-listed classes. A planted or altered file is refused
in one line; nothing of it runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import synthetic_case, to_image
from scipy import ndimage

from sslmedsam2.cli import main

QUICK = ["--quick", "--device", "cpu"]
MODEL = Path("refine/nnunet/results/Dataset500_SSLMedSAM2r00/nnUNetTrainer__nnUNetPlans__3d_fullres")
FINAL = MODEL / "fold_all" / "checkpoint_final.pth"
MANIFEST = Path("refine/checkpoints.sha256")


class RunsCode:
    """Unpickling it writes `marker`: what a planted checkpoint could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('this ran')",)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A workspace after one --quick round: 2 cases with ground truth, 2 with pseudo-labels. Tests that change
    files work on a copy (`ws`)."""
    root = tmp_path_factory.mktemp("safety")
    ws = root / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    for i in range(4):
        image, labels = synthetic_case((12, 40, 40), seed=i)
        sitk.WriteImage(to_image(image), str(root / f"c{i}.nii.gz"))
        if i < 2:
            sitk.WriteImage(to_image(labels), str(root / f"c{i}_gt.nii.gz"))
            extra = ["--label", str(root / f"c{i}_gt.nii.gz")]
        else:
            labels[~ndimage.binary_erosion(labels > 0)] = 0
            sitk.WriteImage(to_image(labels), str(root / f"c{i}_pseudo.nii.gz"))
            extra = ["--pseudo", str(root / f"c{i}_pseudo.nii.gz")]
        assert main(["workspace", "add", str(ws), "--image", str(root / f"c{i}.nii.gz"), *extra]) == 0
    assert main(["refine", str(ws), *QUICK, "--rounds", "1", "--convergence", "1.0"]) == 0
    return ws


@pytest.fixture
def ws(trained, tmp_path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(trained, copy)
    return copy


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(ws: Path, path: Path) -> None:
    """Record `path`'s digest as refine would: someone who can write the manifest too."""
    key = path.relative_to(ws / "refine").as_posix()
    old = (ws / MANIFEST).read_text().splitlines() if (ws / MANIFEST).is_file() else []
    lines = [line for line in old if not line.endswith(f"  {key}")]
    (ws / MANIFEST).write_text("".join(f"{line}\n" for line in [*lines, f"{_sha256(path)}  {key}"]))


def _plant(path: Path, marker: Path) -> None:
    import torch

    path.unlink(missing_ok=True)
    torch.save({"network_weights": RunsCode(marker), "trainer_name": "nnUNetTrainer"}, path)


def _refused(capsys, argv: list[str], *fragments: str, one_line: bool = True) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("sslmedsam2: error: "), err
    assert all(f in err[-1] for f in fragments), err
    assert not any("Traceback" in line for line in err)
    if one_line:
        assert len(err) == 1, err
    return err[-1]


def _predict(ws: Path, tmp_path: Path) -> list[str]:
    return ["predict", str(ws), str(ws / "cases" / "c3" / "image.nii.gz"), "-o", str(tmp_path / "out.nii.gz"),
            "--device", "cpu"]


def test_refine_records_digests_and_predict_loads_weights_only(trained, tmp_path, monkeypatch):
    import torch

    manifest = (trained / MANIFEST).read_text().splitlines()
    recorded = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in manifest}
    folder = MODEL.relative_to("refine").as_posix()
    expected = {f"{folder}/plans.json", f"{folder}/dataset.json", f"{folder}/fold_all/checkpoint_final.pth"}
    assert expected <= set(recorded)
    assert not any(name.endswith("checkpoint_latest.pth") for name in recorded)  # nnU-Net deleted it at the end
    for name, digest in recorded.items():  # `sha256sum -c` in WS/refine would pass
        assert _sha256(trained / "refine" / name) == digest, name
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert main(_predict(trained, tmp_path)) == 0
    assert calls == [True]
    assert set(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out.nii.gz"))).ravel()) <= {0, 1, 2}


@pytest.mark.parametrize("recorded", [False, True], ids=["unrecorded", "recorded"])
def test_predict_refuses_a_planted_checkpoint_and_nothing_runs(ws, tmp_path, capsys, recorded):
    marker = tmp_path / "marker"
    _plant(ws / FINAL, marker)
    if recorded:  # its digest recorded as well: the weights-only loader still refuses it
        _record(ws, ws / FINAL)
    reason = "which could run code" if recorded else "changed since refine wrote it"
    line = _refused(capsys, _predict(ws, tmp_path), str(ws / FINAL), reason, "run `sslmedsam2 refine")
    assert "round_00" in line
    assert not marker.exists(), "unpickling the planted checkpoint ran its code"
    assert not (tmp_path / "out.nii.gz").exists()


def test_an_altered_or_unrecorded_checkpoint_is_refused(ws, tmp_path, capsys):
    import torch

    checkpoint = torch.load(ws / FINAL, weights_only=False)  # the test's own file: trusted
    name = next(iter(checkpoint["network_weights"]))
    checkpoint["network_weights"][name] = checkpoint["network_weights"][name] + 1.0  # valid tensors, other weights
    original = (ws / FINAL).read_bytes()
    torch.save(checkpoint, ws / FINAL)
    _refused(capsys, _predict(ws, tmp_path), str(ws / FINAL), "changed since refine wrote it")
    (ws / FINAL).write_bytes(original)
    key = FINAL.relative_to("refine").as_posix()
    kept = [line for line in (ws / MANIFEST).read_text().splitlines() if not line.endswith(key)]
    (ws / MANIFEST).write_text("".join(f"{line}\n" for line in kept))
    _refused(capsys, _predict(ws, tmp_path), str(ws / FINAL), "no digest of it recorded")
    (ws / MANIFEST).unlink()
    _refused(capsys, _predict(ws, tmp_path), "no digest of it recorded")
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("key", ["network_class_name", "nonlin"])
def test_plans_naming_a_class_off_the_allow_list_are_refused(ws, tmp_path, capsys, key):
    """`this` prints the Zen of Python when imported: nnU-Net's pydoc.locate would import it."""
    if "this" in sys.modules:
        pytest.skip("the module `this` is already imported")
    plans_path = ws / MODEL / "plans.json"
    plans = json.loads(plans_path.read_text())
    architecture = plans["configurations"]["3d_fullres"]["architecture"]
    if key == "network_class_name":
        architecture[key] = "this.s"
    else:
        architecture["arch_kwargs"][key] = "this.s"
    plans_path.write_text(json.dumps(plans))
    _refused(capsys, _predict(ws, tmp_path), str(plans_path), "changed since refine wrote it")
    _record(ws, plans_path)
    _refused(capsys, _predict(ws, tmp_path), str(plans_path), "'this.s'")
    assert "this" not in sys.modules
    # the training side: the preprocessed plans a resumed round trains from
    preprocessed = ws / "refine/nnunet/preprocessed/Dataset500_SSLMedSAM2r00/nnUNetPlans.json"
    preprocessed.write_text(json.dumps(plans))
    shutil.rmtree(ws / MODEL)
    (ws / "refine/rounds/round_00/round.json").unlink()
    _refused(capsys, ["refine", str(ws), *QUICK, "--rounds", "1"], str(preprocessed), "'this.s'", one_line=False)
    assert "this" not in sys.modules


@pytest.mark.parametrize("recorded", [False, True], ids=["unrecorded", "recorded"])
def test_resume_refuses_a_planted_latest_checkpoint_and_nothing_runs(ws, tmp_path, capsys, recorded):
    marker = tmp_path / "marker"
    latest = ws / MODEL / "fold_all" / "checkpoint_latest.pth"
    (ws / FINAL).unlink()
    (ws / "refine/rounds/round_00/round.json").unlink()  # round 0 is unfinished: refine resumes its training
    _plant(latest, marker)
    if recorded:
        _record(ws, latest)
    reason = "which could run code" if recorded else "no digest of it recorded"
    _refused(capsys, ["refine", str(ws), *QUICK, "--rounds", "1"], str(latest), reason, one_line=False)
    assert not marker.exists(), "unpickling the planted checkpoint ran its code"
    assert json.loads((ws / "refine/status.json").read_text())["state"] == "failed"


def test_warm_start_refuses_a_planted_checkpoint_and_nothing_runs(ws, tmp_path, capsys):
    marker = tmp_path / "marker"
    _plant(ws / FINAL, marker)
    _record(ws, ws / FINAL)
    line = _refused(capsys, ["refine", str(ws), *QUICK, "--rounds", "2", "--warm-start", "--convergence", "1.0"],
                    str(ws / FINAL), "which could run code", one_line=False)
    assert "round_00" in line  # what to train again is the round that wrote the checkpoint
    assert not marker.exists(), "unpickling the planted checkpoint ran its code"


def test_warm_start_from_a_recorded_checkpoint_still_works(ws):
    from sslmedsam2.refine.events import read_events

    assert main(["refine", str(ws), *QUICK, "--rounds", "2", "--warm-start", "--convergence", "1.0"]) == 0
    events = read_events(ws / "refine" / "events.jsonl")[0]
    assert [e["epoch"] for e in events if e["event"] == "epoch" and e["round"] == 1] == [1]  # --warm-epochs 1
    recorded = (ws / MANIFEST).read_text().splitlines()
    assert any("Dataset501_SSLMedSAM2r01" in line and line.endswith("checkpoint_final.pth") for line in recorded)
    for line in recorded:
        digest, name = line.split("  ", 1)
        assert _sha256(ws / "refine" / name) == digest, name


def test_a_save_killed_at_any_point_leaves_a_recorded_file(tmp_path, monkeypatch):
    """Checkpoints are published atomically, the new digest recorded before the file appears and the old one
    dropped after: a kill at any instant leaves the file at the path with a recorded digest (no false refusal on
    resume)."""
    from sslmedsam2.errors import UserError
    from sslmedsam2.refine import checkpoints

    manifest, target = tmp_path / checkpoints.MANIFEST, tmp_path / "fold_all" / "checkpoint_latest.pth"
    target.parent.mkdir()
    checkpoints.save_recorded(lambda tmp: tmp.write_bytes(b"epoch 1"), target, manifest)
    assert checkpoints.verified_bytes(target, manifest, "") == b"epoch 1"
    assert manifest.read_text() == f"{hashlib.sha256(b'epoch 1').hexdigest()}  fold_all/checkpoint_latest.pth\n"

    class Killed(BaseException):
        pass

    replace = os.replace

    def killed(source, destination):
        if Path(destination) == target:
            raise Killed()
        replace(source, destination)

    with monkeypatch.context() as patch:  # killed after recording the new digest, before the file is replaced
        patch.setattr(os, "replace", killed)
        with pytest.raises(Killed):
            checkpoints.save_recorded(lambda tmp: tmp.write_bytes(b"epoch 2"), target, manifest)
    assert checkpoints.verified_bytes(target, manifest, "") == b"epoch 1"
    real, calls = checkpoints._write_manifest, []

    def write_once(*args, **kwargs):  # killed after the file is replaced, before the old digest is dropped
        calls.append(1)
        if len(calls) > 1:
            raise Killed()
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "_write_manifest", write_once)
        with pytest.raises(Killed):
            checkpoints.save_recorded(lambda tmp: tmp.write_bytes(b"epoch 3"), target, manifest)
    assert checkpoints.verified_bytes(target, manifest, "") == b"epoch 3"
    target.write_bytes(b"epoch 4")
    with pytest.raises(UserError, match="changed since refine wrote it"):
        checkpoints.verified_bytes(target, manifest, "")
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
