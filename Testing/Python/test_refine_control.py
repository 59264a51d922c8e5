"""The module's control of a refine job (SSLMedSAM2Lib.refine_control, Slicer-free): a detached start, liveness by
the job's lock, a portable stop request that also reaches a job still starting, and the engine's error."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from test_refine import QUICK, _events, study  # noqa: F401 (study is a fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "SSLMedSAM2"))

from SSLMedSAM2Lib.parameters import refine_command  # noqa: E402
from SSLMedSAM2Lib.refine_control import RefineControl  # noqa: E402


def _until_ended(control: RefineControl, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and control.process.poll() is None:
        control.poll()
        time.sleep(0.1)
    assert control.process.poll() is not None, "the job did not end"
    return control.process.returncode


def test_cancel_right_after_start_reaches_the_job_once_it_runs(study):
    control = RefineControl(study)
    control.start([*refine_command(str(study), rounds=1), *QUICK[:1], "--epochs", "8"])
    if os.name == "posix":
        assert os.getsid(control.process.pid) == control.process.pid, "not in a session of its own"
    assert control.running()
    # seconds before the job holds its lock: the request waits for it instead of being lost or going stale
    assert "starting" in control.cancel() and control.stop_pending
    assert _until_ended(control) == 3
    events = _events(study)
    assert events[-1]["event"] == "job" and events[-1]["state"] == "cancelled"
    assert not any(e["event"] == "epoch" and e["epoch"] == 8 for e in events)
    assert not control.running() and not (study / "refine" / "stop").exists()
    assert control.cancel() == ""  # nothing runs any more


def test_a_job_that_fails_at_once_says_why(study):
    control = RefineControl(study)
    control.start(["refine", str(study), "--fold", "0", *QUICK])  # 4 training cases: nnU-Net's folds need 5
    assert _until_ended(control, timeout=60) == 1
    assert "at least 5 training cases" in control.failure()
    assert not control.running()
