"""One shard's pass over its cases: its status records, its cases bar, and what an interrupt or a failed case
leaves to say. `pseudolabel` and `predict --input` drive it; it runs nothing itself."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from sslmedsam2.cohort.cases import check_volumes
from sslmedsam2.cohort.shards import Shard, resolve_shard, shard_of
from sslmedsam2.cohort.status import StatusLog, check_manifest_output, recorded_split
from sslmedsam2.errors import UserError
from sslmedsam2.jobs import Progress, failure_line


def take_shard(outdir: Path, command: str, every: list[Path], requested: tuple[int, int] | None, overwrite: bool,
               log: Callable[[str], None], what: str) -> tuple[Shard, list[Path]]:
    """This process's shard of the sorted cases `every` (`requested` (I, N), or None: the scheduler's array task,
    within the split an earlier run recorded in `outdir`) and its cases, once the output folder is checked as one
    of `command`'s and the cases' headers are read (`what`: what a case is called in messages)."""
    check_manifest_output(outdir, command, overwrite)
    shard = resolve_shard(requested, recorded_split(outdir))
    cases = shard_of(every, shard)
    if shard.count > 1:
        log(f"{shard.describe()}: {len(cases)} of {len(every)} cases")
    check_volumes(cases, what)
    return shard, cases


def interrupt_reason(cause: BaseException) -> str:
    """'interrupted' (Ctrl-C), or 'stopped by SIGTERM' for the command line's signal stops (their first arg)."""
    return f"stopped by {cause.args[0]}" if cause.args else "interrupted"


class ShardInterrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP during a shard, once its status is recorded: what was kept and how to go on."""

    def __init__(self, cause: BaseException, finished: int, total: int, outdir: Path, discarded: int) -> None:
        super().__init__(*cause.args)
        self.cause, self.finished, self.total, self.outdir, self.discarded = cause, finished, total, outdir, discarded

    def kept(self) -> str:
        """What is on disk and how to resume, in one line."""
        under_way = (f"; the {self.discarded} case(s) under way were discarded" if self.discarded else "")
        return (f"{self.finished} of {self.total} cases of this shard are finished and kept in {self.outdir}"
                f"{under_way}; rerun the same command to resume (finished cases are skipped)")


class ShardRun:
    """The status records of one shard's cases. `is_done(case)` verifies a case's outputs; `cases`: the cases bar
    (reset to the cases this run does, updated as each ends)."""

    def __init__(self, outdir: Path, shard: Shard, cases: list[str], is_done: Callable[[str], bool],
                 cases_bar: Progress | None = None) -> None:
        self.outdir, self.shard, self.cases, self.is_done = Path(outdir), shard, cases, is_done
        self.log = StatusLog(outdir, shard)
        self.bar = cases_bar
        self.open: dict[str, float] = {}  # started, not ended: case -> start time
        self.finished: list[str] = []
        self.failed: dict[str, str] = {}

    def begin(self, todo: int) -> None:
        if self.bar is not None and todo:
            self.bar.reset(total=todo)

    def started(self, case: str) -> None:
        self.open[case] = time.perf_counter()
        self.log.write(case, "started")

    def _ended(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def done(self, case: str, seconds: float | None = None) -> None:
        began = self.open.pop(case, None)
        if seconds is None and began is not None:
            seconds = time.perf_counter() - began
        self.log.write(case, "done", None if seconds is None else round(seconds, 2))
        self.finished.append(case)
        self._ended()

    def fail(self, case: str, error: BaseException | str, counted: bool = True) -> str:
        """Record the case as failed with a one-line reason (returned); `counted`: it moves the cases bar."""
        began = self.open.pop(case, None)
        if isinstance(error, BaseException):
            error = failure_line(error) or f"{type(error).__name__}: {error}".splitlines()[0]
        reason = str(error).splitlines()[0] if str(error) else "failed"
        self.log.write(case, "failed", None if began is None else round(time.perf_counter() - began, 2), reason)
        self.failed[case] = reason
        if counted:
            self._ended()
        return reason

    def settle(self, error: BaseException | str) -> int:
        """The shard stops (once the writes under way have ended): each case under way is done if its outputs are
        complete, else failed with `error`'s line (the cases bar does not count it); returns how many failed."""
        discarded = 0
        for case in list(self.open):
            if self.is_done(case):
                self.done(case)
            else:
                self.fail(case, error, counted=False)
                discarded += 1
        return discarded

    def interrupted(self, cause: BaseException) -> ShardInterrupted:
        """After Ctrl-C or a stop signal: settle the cases under way; returns the exception to raise."""
        discarded = self.settle(interrupt_reason(cause))
        finished = sum(bool(self.is_done(c)) for c in self.cases)
        return ShardInterrupted(cause, finished, len(self.cases), self.outdir, discarded)

    def failure(self) -> UserError | None:
        """The shard's one-line error when cases failed (the others are done), else None."""
        if not self.failed:
            return None
        first, reason = next(iter(self.failed.items()))
        return UserError(f"{len(self.failed)} of {len(self.cases)} cases of this shard failed ({first}: {reason}); "
                         f"the others are done; see `sslmedsam2 cohort status {self.outdir}`")
