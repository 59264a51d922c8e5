"""A cohort's files in its output folder, and what `sslmedsam2 cohort status` makes of them.

OUTDIR/cohort.json               the cohort (every case, in shard order, with its output files) and its split
                                 (N shards, the array's first task id), rewritten atomically by every shard at start
OUTDIR/cohort.status/shard-IIII-of-NNNN.jsonl
                                 one JSON object a line per case event of that shard: "time", "case", "state"
                                 (started, done, failed), "seconds", "error" (one line), "shard", "shards", "host",
                                 "pid"; appended (one write, then fsync) by that shard only; a reader skips a line
                                 that is incomplete (a kill during the write)

A case is done when its outputs are complete (its label map and confidence table one result, and its case record
present, naming that result when it names one): the status files say why a case failed, never that one is done.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sslmedsam2 import __version__
from sslmedsam2.cohort.shards import WHOLE, Shard, array_spec, shard_number
from sslmedsam2.errors import UserError

MANIFEST = "cohort.json"
STATUS_DIR = "cohort.status"
KIND = "cohort"
_HOST = socket.gethostname()


@dataclass(frozen=True)
class CaseFiles:
    """A case (its input's file name) and its outputs, relative to the output folder: the label map (with its
    confidence table beside it) and the case record (`<name>.case.json`)."""

    case: str
    labels: str
    record: str


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# --- the manifest ----------------------------------------------------------------------------------------------
def _load_manifest(outdir: Path) -> dict | None:
    path = Path(outdir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_manifest_output(outdir: Path, command: str, overwrite: bool = False) -> None:
    """An existing OUTDIR/cohort.json that this tool did not write is replaced only with --overwrite; one of
    another command (a `pseudolabel` folder given to `predict --input`) is refused."""
    data = _load_manifest(outdir)
    if data is None:
        return
    if data.get("sslmedsam2") != KIND:
        if not overwrite:
            raise UserError(f"{Path(outdir) / MANIFEST} exists and was not written by sslmedsam2; pass --overwrite "
                            "to replace it, or use another output folder")
    elif data.get("command") != command:
        raise UserError(f"{outdir} holds the results of `{data.get('command')}`; give `{command}` another output "
                        "folder")


def read_manifest(outdir: Path) -> dict:
    """The cohort of an output folder; a UserError when there is none."""
    data = _load_manifest(outdir)
    if data is None:
        raise UserError(f"{outdir}: no {MANIFEST} here; it is written by `pseudolabel` and `predict --input` "
                        "when a shard starts")
    if data.get("sslmedsam2") != KIND or not isinstance(data.get("cases"), list):
        raise UserError(f"{Path(outdir) / MANIFEST} is not a cohort file written by sslmedsam2")
    return data


def recorded_split(outdir: Path) -> tuple[int, int] | None:
    """(N shards, the first task id) of the folder's earlier array or --shard runs; None when there were none
    (or only whole-cohort runs, which bind no later split)."""
    data = _load_manifest(outdir) or {}
    split = data.get("split") if data.get("sslmedsam2") == KIND else None
    if not isinstance(split, dict) or split.get("from") == WHOLE:
        return None
    try:
        return int(split["shards"]), int(split["base"])
    except (KeyError, TypeError, ValueError):
        return None


def write_manifest(outdir: Path, command: str, source: Path, cases: list[CaseFiles], shard: Shard) -> None:
    """Record the cohort (`cases` in sorted order: the order shards are dealt from) and this run's split."""
    from sslmedsam2.atomic import write_text

    record = {"sslmedsam2": KIND, "version": __version__, "command": command, "inputs": str(Path(source).resolve()),
              "split": {"shards": shard.count, "base": shard.base, "from": shard.source},
              "cases": [{**asdict(c), "shard": shard_number(i, shard.count)} for i, c in enumerate(cases)],
              "updated": now()}
    write_text(Path(outdir) / MANIFEST, json.dumps(record, indent=1) + "\n")


# --- status files ----------------------------------------------------------------------------------------------
class StatusLog:
    """The status file of one shard: appended by that shard's process only."""

    def __init__(self, outdir: Path, shard: Shard) -> None:
        self.shard = shard
        self.path = Path(outdir) / STATUS_DIR / f"shard-{shard.index:04d}-of-{shard.count:04d}.jsonl"
        self._started = False

    def _append(self, text: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self._started:  # a line a kill cut short must not swallow the next record
                self._started = True
                if self.path.is_file() and self.path.stat().st_size:
                    with open(self.path, "rb") as handle:
                        handle.seek(-1, os.SEEK_END)
                        if handle.read(1) != b"\n":
                            text = "\n" + text
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                os.write(fd, text.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def write(self, case: str, state: str, seconds: float | None = None, error: str | None = None) -> None:
        record = {"time": now(), "case": case, "state": state, "seconds": seconds, "error": error,
                  "shard": self.shard.index, "shards": self.shard.count, "host": _HOST, "pid": os.getpid()}
        self._append(json.dumps(record) + "\n")


def read_records(outdir: Path) -> list[dict]:
    """Every complete record of every shard's status file, oldest first."""
    records = []
    for path in sorted((Path(outdir) / STATUS_DIR).glob("shard-*.jsonl")):
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # cut short by a kill
            if isinstance(record, dict) and isinstance(record.get("case"), str) and isinstance(record.get("time"), str):
                records.append(record)
    return sorted(records, key=lambda r: r["time"])


# --- the summary -----------------------------------------------------------------------------------------------
def case_done(outdir: Path, files: CaseFiles) -> bool:
    """The case's outputs are complete: label map and confidence table of one result, and the case record (which
    names that result, when it names one)."""
    from sslmedsam2.labelmap.confidence import pair_state
    from sslmedsam2.volume.io import image_mark

    labels, record = Path(outdir) / files.labels, Path(outdir) / files.record
    if not record.is_file() or pair_state(labels) != "complete":
        return False
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    result = info.get("result") if isinstance(info, dict) else None
    return result is None or result == image_mark(labels).result


def _alive(record: dict) -> bool:
    if record.get("host") != _HOST:
        return False  # another machine's process: cannot be asked
    try:
        os.kill(int(record["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return isinstance(record.get("pid"), int)
    return True


@dataclass
class CaseStatus:
    case: str
    shard: int
    state: str  # done, failed, running, missing
    reason: str = ""
    seconds: float | None = None


@dataclass
class CohortStatus:
    outdir: str
    command: str
    shards: int
    base: int
    cases: list[CaseStatus] = field(default_factory=list)

    def count(self, state: str) -> int:
        return sum(c.state == state for c in self.cases)

    def rerun_shards(self) -> list[int]:
        """The shards (1-based) holding a failed or missing case."""
        return sorted({c.shard for c in self.cases if c.state in ("failed", "missing")})

    def rerun_array(self) -> str:
        """Those shards as array task ids, e.g. '3,7' for --array=3,7 ('' when none)."""
        return array_spec([s - 1 + self.base for s in self.rerun_shards()])


def cohort_status(outdir: Path, alive: Callable[[dict], bool] = _alive) -> CohortStatus:
    """Every case of the folder's cohort: done (outputs complete), failed (the last record says why; a case
    started and never ended by a process that is gone failed too), running (started by a live process of this
    host) or missing (never started, or its outputs are gone)."""
    data = read_manifest(outdir)
    split = data.get("split") or {}
    status = CohortStatus(str(outdir), str(data.get("command", "")), int(split.get("shards", 1)),
                          int(split.get("base", 1)))
    latest: dict[str, dict] = {}
    for record in read_records(outdir):
        latest[record["case"]] = record
    for entry in data["cases"]:
        files = CaseFiles(entry["case"], entry["labels"], entry["record"])
        record = latest.get(files.case)
        seconds = record.get("seconds") if record else None
        case = CaseStatus(files.case, int(entry.get("shard", 1)), "missing", seconds=seconds)
        if case_done(outdir, files):
            case.state = "done"
        elif record is None:
            case.reason = "never started"
        elif record["state"] == "failed":
            case.state, case.reason = "failed", str(record.get("error") or "failed")
        elif record["state"] == "started" and alive(record):
            case.state, case.reason = "running", f"pid {record.get('pid')}"
        elif record["state"] == "started":
            case.state = "failed"
            where = f"{record.get('host')}, pid {record.get('pid')}"
            case.reason = (f"its process ({where}) ended during this case without a word: killed (time or memory "
                           "limit?)" if record.get("host") == _HOST else
                           f"started on {where} and never ended: killed (time or memory limit?), or still running there")
        else:
            case.reason = "recorded as done, but its outputs are gone or incomplete"
        status.cases.append(case)
    return status
