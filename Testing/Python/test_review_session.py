"""The review state machine the Slicer module drives: transitions, undo/redo, ordering, prompts."""

from __future__ import annotations

import math

import pytest

from sslmedsam2.labelmap.confidence import SliceConfidence
from sslmedsam2.study.review import SliceState as S
from sslmedsam2.study.review_session import ReviewSession


def _session() -> ReviewSession:
    rows = [SliceConfidence(2, 1, "seed", True, 10, 1, 1, 1, 1.0)]
    for z, conf in [(0, 0.9), (1, 0.2), (3, 0.5), (4, 0.2)]:
        rows.append(SliceConfidence(z, 1, "both", True, 5, 0.9, 0.9, 1.0, conf))
    rows.append(SliceConfidence(3, 2, "both", True, 5, 0.9, 0.9, 1.0, 0.1))  # label 2 is less sure on slice 3
    return ReviewSession.from_confidence(rows, 6)


def test_from_confidence_marks_seeds_and_takes_the_least_confident_label():
    session = _session()
    assert session.states[2] == S.SEED and session.states[0] == S.UNREVIEWED
    assert session.confidence[3] == 0.1 and math.isnan(session.confidence[5])


def test_review_order_is_lowest_confidence_first_and_unscored_last():
    session = _session()
    assert session.review_order() == [3, 1, 4, 0, 5]
    session.accept(3)
    assert session.review_order() == [1, 4, 0, 5]


def test_transitions():
    session = _session()
    assert session.accept(1) and session.states[1] == S.ACCEPTED
    assert session.reject(1) and session.states[1] == S.REJECTED
    assert not session.accept(2), "a seed is already a person's"
    assert not session.edited(2) and session.states[2] == S.SEED
    assert session.edited(4) and session.states[4] == S.EDITED
    assert not session.accept(4)
    assert session.prompt_slices() == [2, 4]
    session.accept(0)
    assert session.prompt_slices() == [0, 2, 4]
    with pytest.raises(IndexError):
        session.accept(6)


def test_undo_redo_and_payloads():
    session = _session()
    session.accept(1)
    session.reject(3)
    session.repropagated(payload="segmentation before the run")
    assert session.states[3] == S.UNREVIEWED
    assert session.undo() == "segmentation before the run" and session.states[3] == S.REJECTED
    assert session.undo() is None and session.states[3] == S.UNREVIEWED
    assert session.redo() is None and session.states[3] == S.REJECTED
    session.undo()
    session.undo()
    assert session.states[1] == S.UNREVIEWED and not session.can_undo
    with pytest.raises(LookupError):
        session.undo()
    session.accept(0)
    with pytest.raises(LookupError):
        session.redo()  # a new change drops the redo history


def test_checkpoint_is_undoable_without_changing_states():
    session = _session()
    before = list(session.states)
    session.checkpoint("segmentation before the first run")
    assert session.states == before and session.undo() == "segmentation before the first run"


def test_next_unreviewed_wraps_both_ways():
    session = _session()
    assert session.next_unreviewed(1) == 3  # 2 is a seed
    assert session.next_unreviewed(5) == 0
    assert session.next_unreviewed(0, step=-1) == 5
    for z in (0, 1, 3, 4, 5):
        session.accept(z)
    assert session.next_unreviewed(0) is None
    assert session.counts()["accepted"] == 5 and session.counts()["seed"] == 1
