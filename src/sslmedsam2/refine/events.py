"""The refine job's two files, the API the Slicer module polls.

WS/refine/events.jsonl: one JSON object per line, appended and flushed as things happen. Every event has
  "time" (ISO 8601, UTC), "event" and "round" (int, or null before the first round); by event:
  job        "state": "running"|"finished"|"converged"|"cancelled"|"failed", "message"
  stage      "stage": "export"|"plan"|"train"|"predict"|"score", "message"
  epoch      "epoch" (1-based), "epochs", "loss", "val_loss", "pseudo_dice" (list, one per label), "eta_s"
  round      "mean_dice_change" (mean Dice between the new and the previous pseudo-labels), "dice_change" ({case: Dice}),
             "heldout_dice" (mean Dice against held-out labels, or null), "converged" (bool)
  error      "message"
WS/refine/status.json: the latest state, rewritten atomically: {"state", "round", "stage", "pid", "started",
  "updated", "rounds": [{"round", "mean_dice_change", "heldout_dice"}], "options": {...}, "message"}.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from sslmedsam2.atomic import write_text

STATES = ("running", "finished", "converged", "cancelled", "failed")
FINAL_STATES = ("finished", "converged", "cancelled", "failed")


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


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
