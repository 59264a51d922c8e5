"""Edits that cost what they change: a correction re-tracks outward from its slice until the label's next
conditioning slice or until the result agrees with the previous one; the rest keeps its previous result exactly;
undo restores it; exact on demand; the same through a server."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SIZE, seeds_on, synthetic_case, to_image

from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec
from sslmedsam2.jobs import Cancelled
from sslmedsam2.propagation import local_edit
from sslmedsam2.session.local import LocalSession, corrections
from sslmedsam2.settings import EditRule
from sslmedsam2.volume.slices import SliceVolume

SHAPE = (24, 48, 48)


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor

    return build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)


@pytest.fixture(scope="module")
def case():
    image, labels = synthetic_case(shape=SHAPE)
    volume = SliceVolume.from_image(to_image(image), "axial", IntensitySpec(), "case")
    return volume, labels, seeds_on(labels, {1: [6, 16], 2: [10, 15]})


def _first(volume, seeds, predictor, rule=EditRule()) -> LocalSession:
    session = LocalSession(volume, predictor, rule=rule)
    session.propagate({z: seeds[z] for z in (6, 10, 15, 16)})
    return session


def _label_only(plane: np.ndarray, label: int) -> np.ndarray:
    return np.where(plane == label, label, 0).astype(plane.dtype)


def test_a_correction_holds_exactly_and_slices_beyond_the_stops_keep_their_result(case, predictor):
    volume, labels, seeds = case
    session = _first(volume, seeds, predictor)
    before = session.result
    correction = _label_only(labels[11], 1)
    correction[20:30, 20:30] = 1  # the person paints more liver
    after = session.propagate({11: correction}, replace=False)
    assert after.mode == "local" and after.number == before.number + 1
    np.testing.assert_array_equal(after.labels[11] == 1, correction == 1)
    changed = set(after.retracked)
    assert 11 in changed and changed <= set(range(7, 16)), "label 1 re-tracks between its seeds 6 and 16 at most"
    for z in set(range(SHAPE[0])) - changed:
        np.testing.assert_array_equal(after.labels[z], before.labels[z])
    rows = {(r.slice, r.label): r for r in before.confidence}
    for row in after.confidence:
        if row.slice not in changed:
            assert row == rows[(row.slice, row.label)], "its confidence rows too"
    assert {(r.slice, r.label) for r in after.confidence} == set(rows), "one row per slice and label, as before"


def test_it_stops_at_the_labels_next_conditioning_slice(case, predictor):
    volume, labels, seeds = case
    session = _first(volume, seeds, predictor, EditRule(slices=1000))  # agreement never stops it
    after = session.propagate({11: _label_only(labels[11], 1)}, replace=False)
    assert after.retracked == tuple(range(7, 16)), "forward to 15 (16 is a seed), backward to 7 (6 is a seed)"


def test_it_stops_once_the_result_agrees_for_the_window(case, predictor, monkeypatch):
    """A tracker whose result agrees with the previous one from 3 slices away from the correction on: each
    direction stops once `window` (3) slices in a row agree, well before the seeds at 4 and 18."""
    volume, labels, _ = case
    far = seeds_on(labels, {1: [4, 18]})
    session = LocalSession(volume, predictor, rule=EditRule(slices=3))
    session.propagate({4: far[4], 18: far[18]})
    monkeypatch.setattr(local_edit, "_agreement",
                        lambda passes, previous, entries: [1.0 if abs(z - 11) > 2 else 0.0 for _, z, _ in entries])
    after = session.propagate({11: _label_only(labels[11], 1)}, replace=False)
    assert after.retracked == tuple(range(6, 17)), "13 and 9 disagree, then 3 agreeing slices each way"


def test_an_edit_that_changes_nothing_retracks_only_the_window(case, predictor):
    """Accepting a slice as it is makes it a conditioning slice: it re-tracks until the result has agreed for the
    window (here every slice agrees: Dice 0), both ways, and no further."""
    volume, labels, seeds = case
    session = LocalSession(volume, predictor, rule=EditRule(slices=2, dice=1e-9))
    session.propagate({z: seeds[z] for z in (6, 16)})
    same = _label_only(session.result.labels[11], 1)
    after = session.propagate({11: same}, replace=False)
    assert after.retracked == (9, 10, 11, 12, 13)


def test_undo_restores_the_previous_result_exactly(case, predictor):
    volume, labels, seeds = case
    session = _first(volume, seeds, predictor)
    first = session.result
    session.propagate({11: _label_only(labels[11], 1)}, replace=False)
    second = session.result
    session.propagate({13: _label_only(labels[13], 2)}, replace=False, mode="exact")
    assert session.result.mode == "exact" and session.result.retracked is None
    assert session.undo() is second
    again = session.propagate({13: _label_only(labels[13], 2)}, replace=False)  # from the restored passes
    assert session.undo() is second and session.undo() is first
    np.testing.assert_array_equal(session.result.labels, first.labels)
    assert sorted(session.prompts) == [6, 10, 15, 16]
    redo = session.propagate({11: _label_only(labels[11], 1)}, replace=False)
    np.testing.assert_array_equal(redo.labels, second.labels)  # the restored passes give the same local edit
    assert again.mode == "local"
    with pytest.raises(UserError, match="nothing to undo"):
        LocalSession(volume, predictor).undo()


def test_a_cancelled_edit_changes_nothing(case, predictor):
    volume, labels, seeds = case
    session = _first(volume, seeds, predictor)
    before = session.result
    with pytest.raises(Cancelled):
        session.propagate({11: _label_only(labels[11], 1)}, replace=False, should_stop=lambda: True)
    assert session.result is before and sorted(session.prompts) == [6, 10, 15, 16]
    reference = _first(volume, seeds, predictor).propagate({11: _label_only(labels[11], 1)}, replace=False)
    np.testing.assert_array_equal(session.propagate({11: _label_only(labels[11], 1)}, replace=False).labels,
                                  reference.labels)


def test_removing_a_prompt_or_adding_a_label_runs_the_exact_propagation(case, predictor):
    volume, labels, seeds = case
    session = _first(volume, seeds, predictor)
    assert corrections({1: seeds[10]}, {}) is None
    removed = session.propagate({16: np.zeros_like(seeds[16])}, replace=False)
    assert removed.mode == "exact" and removed.retracked is None
    cold = LocalSession(volume, predictor)
    cold.propagate({z: seeds[z] for z in (6, 10, 15)})
    np.testing.assert_array_equal(removed.labels, cold.result.labels)
    three = seeds[12].copy()
    three[:5, :5] = 3
    assert session.propagate({12: three}, replace=False).mode == "exact"


def test_the_mode_is_checked(case, predictor):
    volume, _, seeds = case
    with pytest.raises(UserError, match="unknown propagation mode 'fast'"):
        _first(volume, seeds, predictor).propagate({6: seeds[6]}, replace=False, mode="fast")
    with pytest.raises(UserError, match="at least 1"):
        EditRule(slices=0).check()


def test_a_local_edit_through_a_server_equals_the_same_edit_here(case, predictor, tiny_checkpoint, tmp_path):
    from sslmedsam2.remote.client import Client, ServerError
    from sslmedsam2.server.limits import ServerSettings
    from sslmedsam2.server.main import serve_in_thread
    from sslmedsam2.session.remote import RemoteSession

    volume, labels, seeds = case
    image, _ = synthetic_case(shape=SHAPE)
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(to_image(image), str(path))
    here = _first(volume, seeds, predictor)
    settings = ServerSettings(port=0, device="cpu", model="sam2.1-tiny", checkpoint=tiny_checkpoint,
                              image_size=TINY_SIZE, workdir=tmp_path)
    with serve_in_thread(settings) as (url, _):
        client = Client(url)
        with RemoteSession(client, path.read_bytes(), path.name, model="sam2.1-tiny", image_size=TINY_SIZE) as there:
            there.propagate({z: seeds[z] for z in (6, 10, 15, 16)})
            edit = {11: _label_only(labels[11], 1)}
            local, remote = here.propagate(edit, replace=False), there.propagate(edit, replace=False)
            assert remote.mode == "local" and remote.retracked == local.retracked
            np.testing.assert_array_equal(remote.labels, local.labels)
            undone = there.undo()
            np.testing.assert_array_equal(undone.labels, here.undo().labels)
            assert client.session(there.id)["can_undo"] is False
            with pytest.raises(ServerError, match="unknown propagation mode") as refused:
                client.propagate(there.id, edit, replace=False, mode="fast")
            assert refused.value.status == 400 and "\n" not in str(refused.value)
        client.close()


def test_the_servers_edit_rule_comes_from_its_command_line(case, tiny_checkpoint, tmp_path):
    """serve --edit-window/--edit-agreement reach every session: with a window of 2 that any mask agrees with, an
    unchanged slice re-tracks 2 slices each way."""
    from sslmedsam2.cli.command import build_parser
    from sslmedsam2.remote.client import Client
    from sslmedsam2.server.main import serve_in_thread, settings_from
    from sslmedsam2.session.remote import RemoteSession

    volume, labels, seeds = case
    image, _ = synthetic_case(shape=SHAPE)
    path = tmp_path / "case.nii.gz"
    sitk.WriteImage(to_image(image), str(path))
    args = build_parser().parse_args(["serve", "--port", "0", "--device", "cpu", "--model", "sam2.1-tiny",
                                      "--checkpoint", str(tiny_checkpoint), "--image-size", str(TINY_SIZE),
                                      "--edit-window", "2", "--edit-agreement", "1e-9"])
    settings = settings_from(args)
    assert settings.edit_rule == EditRule(slices=2, dice=1e-9)
    settings.workdir = tmp_path
    with serve_in_thread(settings) as (url, _):
        client = Client(url)
        with RemoteSession(client, path.read_bytes(), path.name, model="sam2.1-tiny", image_size=TINY_SIZE) as there:
            first = there.propagate({z: seeds[z] for z in (6, 16)})
            after = there.propagate({11: _label_only(first.labels[11], 1)}, replace=False)
            assert after.retracked == (9, 10, 11, 12, 13)
        client.close()
