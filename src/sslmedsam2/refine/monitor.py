"""Reading a refine job from outside: new events since the last look, and progress as a fraction.

Qt-free, so the Slicer module polls with it on a timer and `refine --follow` draws a progress bar with it.
"""

from __future__ import annotations

from datetime import datetime, timezone
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
        self.case = self.cases = 0  # the case being predicted (1-based) and how many
        self.rounds_done = 0
        self.state: str | None = None
        self.last_message = ""
        # pace, for the ETA: when things happened in this run
        self.last_time: datetime | None = None  # the latest event's time
        self.train_eta_s: float | None = None  # nnU-Net's estimate of the rest of the training, at the latest epoch
        self.round_started: dict[int, datetime] = {}
        self.round_seconds: list[float] = []  # rounds that ran whole in this run
        self.stage_seconds: dict[str, float] = {}  # the latest duration of each stage
        self._stage_start: datetime | None = None
        self._first_case: tuple[datetime, int] | None = None  # the first case event of this stage: (time, index)
        self._latest_case: tuple[datetime, int] | None = None
        self._exported: set[int] = set()  # rounds whose first stage ran in this run

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
        when = _time(event)
        if event.get("round") is not None:
            if event["round"] != self.round and when is not None:
                self.round_started.setdefault(event["round"], when)
            self.round = event["round"]
            self.rounds_done = max(self.rounds_done, self.round + (kind == "round"))
        if kind == "job":
            self.state = event["state"]
        elif kind == "stage":
            if self.stage is not None and self._stage_start is not None and when is not None:
                self.stage_seconds[self.stage] = (when - self._stage_start).total_seconds()
            self.stage, self.epoch, self.case, self.cases = event["stage"], 0, 0, 0
            self._stage_start, self._first_case, self._latest_case = when, None, None
            self.train_eta_s = None
            if self.stage == "export" and self.round is not None:
                self._exported.add(self.round)
            self.last_message = event.get("message", "")
        elif kind == "epoch":
            self.epoch, self.epochs = event["epoch"], event["epochs"]
            self.pseudo_dice = event.get("pseudo_dice", [])
            self.train_eta_s = event.get("eta_s")
        elif kind == "case":
            self.case, self.cases = event["index"], event["cases"]
            if when is not None:
                self._latest_case = (when, self.case)
                self._first_case = self._first_case or self._latest_case
        elif kind == "round":
            if self.stage is not None and self._stage_start is not None and when is not None:
                self.stage_seconds[self.stage] = (when - self._stage_start).total_seconds()
            started = self.round_started.get(event["round"])
            if started is not None and when is not None and self._ran_whole(event["round"]):
                self.round_seconds.append((when - started).total_seconds())
        elif kind == "error":
            self.last_message = event.get("message", "")
        if when is not None:
            self.last_time = when

    def _ran_whole(self, round_: int) -> bool:
        """A round that began with its first stage in this run (not one resumed halfway) counts for the pace."""
        return round_ in self._exported

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
        if self.stage == "predict" and self.cases:
            within += (_STAGE_SHARE["sam2"] - _STAGE_SHARE["predict"]) * (self.case - 1) / self.cases
        return min(1.0, (self.round + within) / max(rounds, 1))

    def describe(self) -> str:
        parts = [f"round {self.round}" if self.round is not None else "starting"]
        if self.stage:
            parts.append(self.stage)
        if self.stage == "train" and self.epochs:
            parts.append(f"epoch {self.epoch}/{self.epochs}")
            if self.pseudo_dice:
                parts.append("pseudo-Dice " + "/".join(f"{d:.2f}" for d in self.pseudo_dice))
        if self.stage == "predict" and self.cases:
            parts.append(f"case {self.case}/{self.cases}")
        return ", ".join(parts)

    # --- time left -----------------------------------------------------------------------------------------------
    def _case_seconds(self) -> float | None:
        if self._first_case is None or self._latest_case is None or self._latest_case[1] <= self._first_case[1]:
            return None
        return (self._latest_case[0] - self._first_case[0]).total_seconds() / (self._latest_case[1] - self._first_case[1])

    def _left_in_round(self, since: float) -> float | None:
        """Seconds left in the current round from its stage's own pace; None while unknown."""
        after_train = self.stage_seconds.get("predict")
        if self.stage == "train" and self.train_eta_s is not None and after_train is not None:
            return max(self.train_eta_s - since, 0.0) + after_train + self.stage_seconds.get("sam2", 0.0)
        per_case = self._case_seconds()
        if self.stage == "predict" and per_case is not None:
            return max(per_case * (self.cases - self.case + 1) - since, 0.0) + self.stage_seconds.get("sam2", 0.0)
        return None

    def eta_s(self, rounds: int, now: datetime | None = None) -> float | None:
        """Seconds until the job's last round (--rounds; convergence may end it sooner) is done, from this run's
        pace; None until it is known (a first round gives it; before, the stage's own pace)."""
        if self.finished:
            return 0.0
        if self.round is None or self.last_time is None:
            return None
        now = now or datetime.now(timezone.utc)
        since = max(0.0, (now - self.last_time).total_seconds())
        per_round = sum(self.round_seconds) / len(self.round_seconds) if self.round_seconds else None
        left = self._left_in_round(since)
        if left is None and per_round is not None and self.round in self.round_started:
            left = max(per_round - (now - self.round_started[self.round]).total_seconds(), 0.0)
        later = max(rounds - self.round - 1, 0)
        if left is None or (later and per_round is None):
            return None
        return left + later * (per_round or 0.0)

    def summary(self, rounds: int, now: datetime | None = None) -> str:
        """One line for a progress bar: where the job is, rounds done, and the time left when known (that of the
        whole job, else of the current training or prediction)."""
        text = self.describe()
        if self.round is not None and not self.finished:
            text += f" | {self.rounds_done}/{rounds} rounds done"
        eta = self.eta_s(rounds, now)
        if eta is not None and not self.finished:
            return f"{text} | ETA {format_seconds(eta)}"
        since = max(0.0, ((now or datetime.now(timezone.utc)) - self.last_time).total_seconds()) if self.last_time else 0
        if self.stage == "train" and self.train_eta_s is not None:
            return f"{text} | training ETA {format_seconds(max(self.train_eta_s - since, 0.0))}"
        per_case = self._case_seconds()
        if self.stage == "predict" and per_case is not None:
            left = max(per_case * (self.cases - self.case + 1) - since, 0.0)
            return f"{text} | prediction ETA {format_seconds(left)}"
        return text


def format_seconds(seconds: float) -> str:
    """3725 -> '1 h 2 min', 125 -> '2 min 5 s', 7 -> '7 s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def _time(event: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(event["time"])
    except (KeyError, TypeError, ValueError):
        return None
