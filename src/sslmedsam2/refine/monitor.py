"""Reading a refine job from outside: new events since the last look, and progress as a fraction.

Qt-free, so the Slicer module polls with it on a timer and `refine --follow` draws a progress bar with it.
"""

from __future__ import annotations

from pathlib import Path

from sslmedsam2.refine.events import FINAL_STATES, EventLog, read_events

# Share of a round spent in each stage, for the progress fraction (training dominates).
_STAGE_SHARE = {"export": 0.0, "plan": 0.02, "train": 0.07, "predict": 0.92, "sam2": 0.95, "score": 0.98}


class JobMonitor:
    def __init__(self, refine_dir: Path) -> None:
        self.log = EventLog(Path(refine_dir))
        self.offset = 0
        self.rounds = 1
        self.round: int | None = None
        self.stage: str | None = None
        self.epoch = self.epochs = 0
        self.pseudo_dice: list[float] = []  # nnU-Net's per-label pseudo-Dice of the latest epoch
        self.state: str | None = None
        self.last_message = ""

    def attach_to_latest_run(self) -> None:
        """Start from the latest run's first event, so a previous run's ending is not taken for this one's."""
        events, _ = read_events(self.log.path, 0)
        starts = [i for i, e in enumerate(events) if e["event"] == "job" and e["state"] == "running"]
        if not starts:
            return
        with open(self.log.path, "rb") as handle:
            offsets = [0]
            for line in handle:
                offsets.append(offsets[-1] + len(line))
        self.offset = offsets[starts[-1]]

    def poll(self) -> list[dict]:
        events, self.offset = read_events(self.log.path, self.offset)
        for event in events:
            self.update(event)
        return events

    def update(self, event: dict) -> None:
        kind = event["event"]
        if event.get("round") is not None:
            self.round = event["round"]
        if kind == "job":
            self.state = event["state"]
        elif kind == "stage":
            self.stage, self.epoch = event["stage"], 0
            self.last_message = event.get("message", "")
        elif kind == "epoch":
            self.epoch, self.epochs = event["epoch"], event["epochs"]
            self.pseudo_dice = event.get("pseudo_dice", [])
        elif kind == "error":
            self.last_message = event.get("message", "")

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def fraction(self, rounds: int) -> float:
        """Done share of the whole job, 0..1 (rounds: the job's --rounds)."""
        if self.state in ("finished", "converged"):
            return 1.0
        if self.round is None or self.stage is None:
            return 0.0
        within = _STAGE_SHARE.get(self.stage, 0.0)
        if self.stage == "train" and self.epochs:
            within += (_STAGE_SHARE["predict"] - _STAGE_SHARE["train"]) * self.epoch / self.epochs
        return min(1.0, (self.round + within) / max(rounds, 1))

    def describe(self) -> str:
        parts = [f"round {self.round}" if self.round is not None else "starting"]
        if self.stage:
            parts.append(self.stage)
        if self.stage == "train" and self.epochs:
            parts.append(f"epoch {self.epoch}/{self.epochs}")
            if self.pseudo_dice:
                parts.append("pseudo-Dice " + "/".join(f"{d:.2f}" for d in self.pseudo_dice))
        return ", ".join(parts)
