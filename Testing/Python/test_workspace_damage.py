"""A hand-edited or damaged workspace is one line `sslmedsam2: error: ...` (exit 1) for every command that reads
it, never a traceback, and changes nothing; a case whose files were deleted is shown as such (issue 20, item 7)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import synthetic_case, to_image

from sslmedsam2.cli import main
from sslmedsam2.errors import UserError
from sslmedsam2.study.workspace import init_workspace

SHAPE = (6, 16, 16)  # 6 axial slices


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """inputs/ (images and labels) and ws/: g0 with ground truth, p0 with a pseudo-label (and review file)."""
    root = tmp_path_factory.mktemp("damage")
    inputs = root / "inputs"
    inputs.mkdir()
    for i in range(3):
        image, labels = synthetic_case(SHAPE, seed=i)
        sitk.WriteImage(to_image(image), str(inputs / f"c{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(inputs / f"c{i}_gt.nii.gz"))
    ws = root / "ws"
    assert main(["workspace", "init", str(ws), "--label", "a=1", "--label", "b=2"]) == 0
    assert main(["workspace", "add", str(ws), "--image", str(inputs / "c0.nii.gz"), "--label",
                 str(inputs / "c0_gt.nii.gz"), "--id", "g0"]) == 0
    assert main(["workspace", "add", str(ws), "--image", str(inputs / "c1.nii.gz"), "--pseudo",
                 str(inputs / "c1_gt.nii.gz"), "--eval-label", str(inputs / "c1_gt.nii.gz"), "--id", "p0"]) == 0
    assert (ws / "cases" / "p0" / "review.json").is_file()
    return root


@pytest.fixture
def study(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the template; a refine that got as far as training fails the test at once."""
    shutil.copytree(template, tmp_path / "t")

    def trains(self):
        raise AssertionError("refine got as far as training on a damaged workspace")

    monkeypatch.setattr("sslmedsam2.refine.rounds.RefineJob.run", trains)
    return tmp_path / "t"


def _index(ws: Path) -> dict:
    return json.loads((ws / "workspace.json").read_text())


def _edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(ws: Path) -> None:
        data = _index(ws)
        change(data)
        (ws / "workspace.json").write_text(json.dumps(data))
    return apply


def _write(text: str | bytes, name: str = "workspace.json") -> Callable[[Path], None]:
    def apply(ws: Path) -> None:
        target = ws / name
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
    return apply


def _review(states) -> Callable[[Path], None]:
    return _write(json.dumps(states), "cases/p0/review.json")


def _escaping_case(case_id: str, folder: Callable[[Path], Path]) -> Callable[[Path], None]:
    """An index entry whose id leads out of WS/cases, to a folder holding a genuine case (so that only the id is
    wrong: code that does not check it reads that folder)."""
    def apply(ws: Path) -> None:
        target = folder(ws)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("image.nii.gz", "review.json", "pseudo.nii.gz"):
            shutil.copy(ws / "cases" / "p0" / name, target / name)
        _edit(lambda d: d["cases"].__setitem__(case_id, {"label": False, "pseudo": True, "eval": False}))(ws)
    return apply


def _absolute_case(ws: Path) -> None:
    """An absolute id: the path of a folder of the test's own."""
    _escaping_case(str(ws.parent / "abs"), lambda ws: ws.parent / "abs")(ws)


def _set(key: str, value) -> Callable[[Path], None]:
    return _edit(lambda d: d.__setitem__(key, value))


def _drop(key: str) -> Callable[[Path], None]:
    return _edit(lambda d: d.pop(key))


def _label(value) -> Callable[[Path], None]:
    return _edit(lambda d: d["labels"].__setitem__("a", value))


def _case_info(value) -> Callable[[Path], None]:
    return _edit(lambda d: d["cases"].__setitem__("p0", value))


CASE_SHAPE = 'case p0: {"label": true|false'

# (id, damage, a fragment the error line must hold)
DAMAGE = [
    ("not-json", _write("{\"schema_version\": 1,"), "not JSON"),
    ("not-utf8", _write(b"\xff\xfe{}"), "not JSON"),
    ("a-list", _write("[]"), "JSON object"),
    ("empty-object", _write("{}"), "schema_version"),
    ("version-string", _set("schema_version", "1"), "schema_version"),
    ("version-zero", _set("schema_version", 0), "schema_version"),
    ("no-axis", _drop("axis"), "axis missing"),
    ("no-labels", _drop("labels"), "labels missing"),
    ("no-channel", _drop("channel"), "channel missing"),
    ("no-cases", _drop("cases"), "cases missing"),
    ("cases-empty-list", _set("cases", []), "cases"),
    ("cases-list-of-ids", _set("cases", ["g0", "p0"]), "cases"),
    ("cases-null", _set("cases", None), "cases"),
    ("case-info-true", _case_info(True), CASE_SHAPE),
    ("case-info-empty", _case_info({}), CASE_SHAPE),
    ("case-flag-string", _case_info({"label": False, "pseudo": "yes", "eval": True}), CASE_SHAPE),
    ("unknown-axis", _set("axis", "oblique"), "axis 'oblique'"),
    ("axis-number", _set("axis", 2), "axis 2"),
    ("unknown-channel", _set("channel", "PET"), "channel 'PET'"),
    ("channel-null", _set("channel", None), "channel None"),
    ("labels-list", _set("labels", ["a", "b"]), "labels"),
    ("labels-string", _set("labels", "a=1"), "labels"),
    ("label-string-value", _label("one"), "label 'a'"),
    ("label-float", _label(1.5), "label 'a'"),
    ("label-bool", _label(True), "label 'a'"),
    ("label-zero", _label(0), "label 'a'"),
    ("label-negative", _label(-1), "label 'a'"),
    ("label-too-large", _label(70000), "label 'a'"),
    ("label-no-room-for-ignore", _label(65535), "label 'a'"),
    ("labels-share-a-value", _label(2), "distinct"),
    ("label-named-background", _edit(lambda d: d["labels"].update(background=3)), "background"),
    ("id-parent-parent", _escaping_case("../../x", lambda ws: ws.parent / "x"), "'../../x'"),
    ("id-parent", _escaping_case("..", lambda ws: ws), "'..'"),
    ("id-absolute", _absolute_case, "case id '/"),
    ("id-slash", _escaping_case("a/b", lambda ws: ws / "cases" / "a" / "b"), "'a/b'"),
    ("id-empty", _escaping_case("", lambda ws: ws / "cases"), "''"),
    ("id-hidden", _escaping_case(".hidden", lambda ws: ws / "cases" / ".hidden"), "'.hidden'"),
    ("id-newline", _escaping_case("x\n", lambda ws: ws / "cases" / "x\n"), "'x\\n'"),
    ("review-not-json", _write("{\"states\": [", "cases/p0/review.json"), "not JSON"),
    ("review-a-list", _review(["unreviewed"] * SHAPE[0]), "review.json"),
    ("review-no-states", _review({"axis": "axial"}), "review.json"),
    ("review-states-null", _review({"axis": "axial", "states": None}), "review.json"),
    ("review-unknown-state", _review({"axis": "axial", "states": ["unreviewed"] * 5 + ["maybe"]}), "'maybe'"),
    ("review-state-number", _review({"axis": "axial", "states": ["unreviewed"] * 5 + [3]}), "state 3"),
    ("review-too-few", _review({"axis": "axial", "states": ["accepted"] * (SHAPE[0] - 2)}), "4 review states"),
    ("review-too-many", _review({"axis": "axial", "states": ["accepted"] * (SHAPE[0] + 3)}), "9 review states"),
    ("review-other-axis", _review({"axis": "coronal", "states": ["accepted"] * SHAPE[0]}), "'coronal'"),
]


def _commands(root: Path) -> dict[str, list[str]]:
    ws = str(root / "ws")
    return {"status": ["workspace", "status", ws, "--json"],
            "add": ["workspace", "add", ws, "--image", str(root / "inputs" / "c2.nii.gz"), "--id", "new"],
            "review": ["workspace", "review", ws, "p0", "--slices", "1,2", "--state", "accepted"],
            "refine": ["refine", ws, "--quick", "--device", "cpu"]}


def _one_line_error(capsys, argv: list[str], fragment: str) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sslmedsam2: error: "), err
    assert fragment in err[0], err[0]
    assert not captured.out.strip(), captured.out
    return err[0]


def _files(ws: Path) -> dict[str, bytes]:
    return {str(p.relative_to(ws)): p.read_bytes() for p in sorted(ws.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["status", "add", "review", "refine"])
@pytest.mark.parametrize("name, damage, fragment", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_workspace_is_one_line(study, capsys, command, name, damage, fragment):
    ws = study / "ws"
    damage(ws)
    before = _files(ws)
    _one_line_error(capsys, _commands(study)[command], fragment)
    assert _files(ws) == before  # nothing written: no case added, no review changed, no refine folder
    assert not (ws / "refine").exists() and not (ws / "cases" / "new").exists()


def test_case_id_from_the_command_line_is_checked_the_same_way(study, capsys):
    for bad in ("x\n", "..", ".hidden", "a/b", ""):
        argv = _commands(study)["add"][:-1] + [bad]
        _one_line_error(capsys, argv, "case id")
    assert "new" not in _index(study / "ws")["cases"]


@pytest.mark.parametrize("settings, fragment", [({"channel": "PET"}, "channel"), ({"axis": "oblique"}, "axis"),
                                                ({"labels": {"background": 1}}, "background"),
                                                ({"labels": {"a": 65535}}, "label 'a'")])
def test_init_refuses_what_open_would_refuse(tmp_path, settings, fragment):
    with pytest.raises(UserError, match=fragment):
        init_workspace(tmp_path / "ws", **settings)
    assert not (tmp_path / "ws" / "workspace.json").exists()


# --- a case whose files were deleted ---------------------------------------------------------------------------
def _delete(ws: Path, case: str, *names: str) -> None:
    for name in names:
        (ws / "cases" / case / name).unlink()


def _status(capsys, ws: Path, *extra: str) -> str:
    capsys.readouterr()
    assert main(["workspace", "status", str(ws), *extra]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("case, names", [("p0", ["image.nii.gz"]), ("p0", ["pseudo.nii.gz", "eval.nii.gz"]),
                                         ("g0", ["label.nii.gz"]), ("g0", ["image.nii.gz", "label.nii.gz"])])
def test_status_lists_a_case_whose_files_were_deleted(study, capsys, case, names):
    ws = study / "ws"
    _delete(ws, case, *names)
    text = _status(capsys, ws)
    line = next(line for line in text.splitlines() if line.strip().startswith(case))
    assert f"files missing: {', '.join(names)}" in line, text
    other = next(line for line in text.splitlines() if line.strip().startswith({"p0": "g0", "g0": "p0"}[case]))
    assert "files missing" not in other
    cases = {c["id"]: c for c in json.loads(_status(capsys, ws, "--json"))["cases"]}
    assert cases[case]["files_missing"] == names
    assert cases[{"p0": "g0", "g0": "p0"}[case]]["files_missing"] == []


def test_a_whole_case_folder_deleted(study, capsys):
    ws = study / "ws"
    shutil.rmtree(ws / "cases" / "p0")
    cases = {c["id"]: c for c in json.loads(_status(capsys, ws, "--json"))["cases"]}
    assert cases["p0"]["files_missing"] == ["image.nii.gz", "pseudo.nii.gz", "eval.nii.gz"]
    _one_line_error(capsys, _commands(study)["review"], "image.nii.gz, pseudo.nii.gz, eval.nii.gz")
    _one_line_error(capsys, _commands(study)["refine"], "case p0")


@pytest.mark.parametrize("name", ["image.nii.gz", "pseudo.nii.gz"])
def test_review_of_a_case_whose_files_were_deleted(study, capsys, name):
    ws = study / "ws"
    _delete(ws, "p0", name)
    before = _files(ws)
    line = _one_line_error(capsys, _commands(study)["review"], name)
    assert "p0" in line and "files missing" in line
    assert _files(ws) == before


def test_other_cases_stay_reviewable(study, capsys, template):
    """Only the case whose files are gone is refused; a case added without a review file is all unreviewed."""
    ws = study / "ws"
    assert main(["workspace", "add", str(ws), "--image", str(study / "inputs" / "c2.nii.gz"), "--pseudo",
                 str(study / "inputs" / "c2_gt.nii.gz"), "--id", "p1"]) == 0
    (ws / "cases" / "p1" / "review.json").unlink()  # as an older workspace may have it
    _delete(ws, "p0", "image.nii.gz")
    assert main(["workspace", "review", str(ws), "p1", "--slices", "0,5", "--state", "rejected"]) == 0
    states = json.loads((ws / "cases" / "p1" / "review.json").read_text())["states"]
    assert states == ["rejected"] + ["unreviewed"] * 4 + ["rejected"]


def test_refine_names_every_case_whose_files_were_deleted(study, capsys):
    ws = study / "ws"
    _delete(ws, "p0", "pseudo.nii.gz")
    _delete(ws, "g0", "image.nii.gz")
    line = _one_line_error(capsys, _commands(study)["refine"], "case g0 has no image.nii.gz")
    assert "case p0 has no pseudo.nii.gz" in line
    assert not (ws / "refine").exists()


def test_add_refuses_while_a_case_has_files_missing(study, capsys):
    ws = study / "ws"
    _delete(ws, "g0", "label.nii.gz")
    before = _files(ws)
    _one_line_error(capsys, _commands(study)["add"], "case g0 has no label.nii.gz")
    assert _files(ws) == before
