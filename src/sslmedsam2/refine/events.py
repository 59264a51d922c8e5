"""The refine job's two files, the API the Slicer module polls.

WS/refine/events.jsonl: one JSON object per line, appended and flushed as things happen. Every event has
  "time" (ISO 8601, UTC), "event" and "round" (int, or null before the first round); by event:
  job        "state": "running"|"finished"|"converged"|"cancelled"|"failed", "message"
  stage      "stage": "export"|"plan"|"train"|"predict"|"sam2" (--sam2-from-nnunet)|"score", "message"
  epoch      "epoch" (1-based), "epochs", "loss", "val_loss", "pseudo_dice" (list, one per label), "eta_s"
  case       "stage" ("predict"), "case", "index" (1-based), "cases": a case's prediction begins
  round      "mean_dice_change" (mean Dice between the new and the previous pseudo-labels), "dice_change" ({case: Dice}),
             "label_change" ({label name: mean Dice over cases}), "heldout" ({case: Dice}), "heldout_dice" (mean
             Dice against held-out labels, or null), "label_heldout" ({label name: mean}), "converged" (bool); with
             --sam2-from-nnunet also "sources" ({"sam2", "nnunet", "human"}: slices won, all cases) and
             "case_sources" ({case: ...})
  error      "message"
WS/refine/status.json: the latest state, rewritten atomically: {"state", "round", "stage", "pid", "started",
  "updated", "rounds": [{"round", "mean_dice_change", "heldout_dice"}], "options": {...}, "message"}.
WS/refine/.lock: held by the running job; WS/refine/stop: a stop request (the job stops at its next safe point).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from sslmedsam2.atomic import write_text

STATES = ("running", "finished", "converged", "cancelled", "failed")
FINAL_STATES = ("finished", "converged", "cancelled", "failed")
LOCK_NAME = ".lock"
STOP_NAME = "stop"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class EventLog:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "events.jsonl"
        self.status_path = Path(folder) / "status.json"

    def emit(self, event: str, round_: int | None = None, **fields: object) -> dict:
        record = {"time": now(), "event": event, "round": round_, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return record

    def read_status(self) -> dict:
        if not self.status_path.is_file():
            return {}
        return json.loads(self.status_path.read_text(encoding="utf-8"))

    def write_status(self, status: dict) -> None:
        write_text(self.status_path, json.dumps({**status, "updated": now()}, indent=2) + "\n")


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete lines from byte `offset` on, and the offset to continue from (a half-written line waits)."""
    path = Path(path)
    if not path.is_file():
        return [], offset
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


def job_lock(refine_dir: Path) -> FileLock:
    """The lock a running job holds. The OS drops it when the process ends, however it ends, so it is the job's
    liveness on every platform (os.kill(pid, 0) is no check on Windows, and a pid can be reused)."""
    return FileLock(str(Path(refine_dir) / LOCK_NAME))


def job_running(refine_dir: Path) -> bool:
    """Whether a job holds the workspace's lock now (a probe that takes it for an instant when free)."""
    if not (Path(refine_dir) / LOCK_NAME).exists():
        return False
    probe = job_lock(refine_dir)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def request_stop(refine_dir: Path) -> None:
    """Ask the running job to stop at its next safe point: a file it looks for, since a signal is no gentle stop
    on Windows (SIGTERM is TerminateProcess there). The job removes it when it ends."""
    write_text(Path(refine_dir) / STOP_NAME, now() + "\n")


def stop_requested(refine_dir: Path) -> bool:
    return (Path(refine_dir) / STOP_NAME).exists()


def clear_stop_request(refine_dir: Path) -> None:
    (Path(refine_dir) / STOP_NAME).unlink(missing_ok=True)
