"""One session API, two engines: a LocalSession and a RemoteSession (through a server) take the same prompts the
same way and give the same results; a failed or cancelled propagation changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import TINY_SIZE, seeds_on, synthetic_case, to_image

from sslmedsam2.errors import UserError
from sslmedsam2.frames import IntensitySpec
from sslmedsam2.jobs import Cancelled
from sslmedsam2.remote.client import JobCancelled
from sslmedsam2.session.local import LocalSession
from sslmedsam2.session.remote import RemoteSession
from sslmedsam2.volume import read_image
from sslmedsam2.volume.slices import SliceVolume


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    image, labels = synthetic_case(shape=(10, 32, 32))
    path = tmp_path_factory.mktemp("case") / "image.nii.gz"
    sitk.WriteImage(to_image(image), str(path))
    return path, seeds_on(labels, {1: [3, 5, 7], 2: [8]})


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor

    return build_predictor(get_model("sam2.1-tiny"), tiny_checkpoint, "cpu", TINY_SIZE)


@pytest.fixture(params=["local", "remote"])
def session(request, image_file, predictor):
    path, _ = image_file
    if request.param == "local":
        volume = SliceVolume.from_image(read_image(path), "axial", IntensitySpec(), path.name)
        yield LocalSession(volume, predictor)
        return
    client = request.getfixturevalue("engine_server")
    with RemoteSession(client, path.read_bytes(), path.name, model="sam2.1-tiny", image_size=TINY_SIZE) as remote:
        yield remote


def _planes(seeds, slices):
    return {z: seeds[z] for z in slices}


def test_prompts_are_replaced_or_laid_over_and_a_zero_plane_removes_one(session, image_file):
    _, seeds = image_file
    first = session.propagate(_planes(seeds, (3, 7)))
    assert sorted(session.prompts) == [3, 7] and first.number == 1 and session.result is first
    assert first.labels.shape == session.grid.shape and len(first.mark) == 16
    edited = session.propagate(_planes(seeds, (5,)), replace=False)
    assert sorted(session.prompts) == [3, 5, 7] and edited.number == 2
    removed = session.propagate({7: np.zeros_like(seeds[7])}, replace=False)
    assert sorted(session.prompts) == [3, 5] and removed.number == 3
    replaced = session.propagate(_planes(seeds, (7,)))
    assert sorted(session.prompts) == [7]
    np.testing.assert_array_equal(replaced.labels[7], seeds[7])  # a prompt comes back exactly as drawn


def test_a_refused_or_cancelled_propagation_changes_nothing(session, image_file):
    _, seeds = image_file
    done = session.propagate(_planes(seeds, (3,)))
    with pytest.raises(UserError, match="no labelled voxel"):
        session.propagate({3: np.zeros_like(seeds[3])}, replace=False)
    with pytest.raises((Cancelled, JobCancelled)):
        session.propagate(_planes(seeds, (7,)), should_stop=lambda: True)
    assert sorted(session.prompts) == [3] and session.result.number == done.number
    np.testing.assert_array_equal(session.result.labels, done.labels)


def test_local_and_remote_sessions_give_the_same_result(image_file, predictor, engine_server):
    path, seeds = image_file
    volume = SliceVolume.from_image(read_image(path), "axial", IntensitySpec(), path.name)
    local = LocalSession(volume, predictor)
    with RemoteSession(engine_server, path.read_bytes(), path.name, model="sam2.1-tiny",
                       image_size=TINY_SIZE) as remote:
        for update, replace in ((_planes(seeds, (3, 8)), True), (_planes(seeds, (5,)), False)):
            here, there = local.propagate(update, replace), remote.propagate(update, replace)
            np.testing.assert_array_equal(here.labels, there.labels)
            ordered = [sorted(rows, key=lambda r: (r.slice, r.label)) for rows in (here.confidence, there.confidence)]
            assert [(r.slice, r.label) for r in ordered[0]] == [(r.slice, r.label) for r in ordered[1]]
            for a, b in zip(*ordered):
                assert (a.label, a.source, a.present, a.voxels) == (b.label, b.source, b.present, b.voxels)
                assert a.confidence == pytest.approx(b.confidence, abs=1e-3, nan_ok=True)
        assert remote.grid == local.grid
