"""`sslmedsam2 cohort status OUTDIR`, and what the commands that run a cohort (pseudolabel, predict --input)
share: two progress bars (cases over the case under way), and an interrupt that says what was kept."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import sslmedsam2.cli.options as options
from sslmedsam2.cli.options import say


class _CasesBar:
    """The overall bar: this run's cases done of total, with tqdm's ETA; appears at the first reset."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar = None

    def reset(self, total: int | None = None) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(desc=self.desc, unit="case", total=total, file=sys.stderr, dynamic_ncols=True, position=0)
        else:
            self.bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CohortBars:
    """`cases`: the overall bar (cases of this run, ETA); `case`: the bar of the case under way (options.ProgressBar,
    drawn under it), None for commands whose engine draws its own; `log`: a message line that leaves the bars
    intact."""

    def __init__(self, command: str, unit: str | None = "slice") -> None:
        self.cases = _CasesBar(f"{command}: cases")
        self.case = options.ProgressBar(f"{command}: case", unit=unit) if unit else None

    @staticmethod
    def log(message: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"sslmedsam2: {message}", file=sys.stderr)
        sys.stderr.flush()

    def __enter__(self) -> "CohortBars":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.case is not None:
            self.case.__exit__(*exc)
        self.cases.close()


class Interrupted:
    """What run_shard returns after an interrupt: the command's exit code."""

    code = 130


def run_shard(work: Callable[[CohortBars], object], command: str, unit: str | None = "slice") -> object:
    """Run a shard's work under the two bars and return its result. Ctrl-C, SIGTERM or SIGHUP: one line with what
    was kept and how to resume, and an Interrupted."""
    from sslmedsam2.cohort.run import ShardInterrupted, interrupt_reason

    try:
        with CohortBars(command, unit) as bars:
            return work(bars)
    except ShardInterrupted as exc:
        say(f"{interrupt_reason(exc.cause)}; {exc.kept()}")
        return Interrupted()


def cmd_cohort(args: argparse.Namespace) -> int:
    from sslmedsam2.cohort.status import cohort_status

    status = cohort_status(args.outdir)
    if args.json:
        print(json.dumps({**asdict(status), "rerun_shards": status.rerun_shards(), "rerun_array": status.rerun_array()},
                         indent=2))
        return 0
    counts = ", ".join(f"{status.count(s)} {s}" for s in ("done", "failed", "running", "missing"))
    print(f"{status.outdir}: {status.command} cohort of {len(status.cases)} cases in {status.shards} shard(s): {counts}")
    for state in ("failed", "running", "missing"):
        chosen = [c for c in status.cases if c.state == state]
        if chosen:
            print(f"{state}:")
            for c in chosen:
                print(f"  {c.case}  (shard {c.shard}): {c.reason}")
    shards = status.rerun_shards()
    if shards:
        print(f"shards to rerun: {', '.join(map(str, shards))} of {status.shards} (array tasks from {status.base})")
        print(f"--array={status.rerun_array()}")
    else:
        print("nothing to rerun" + (" (cases are still running)" if status.count("running") else ""))
    return 0


def add_cohort_command(sub) -> None:
    c = sub.add_parser("cohort", help="the state of a cohort run as cluster array jobs (pseudolabel, predict --input)",
                       description="Read OUTDIR/cohort.json and the shards' status files (OUTDIR/cohort.status/).")
    csub = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = csub.add_parser("status", help="done, failed (with why), missing cases, and the shards to rerun",
                        description="Every case of the cohort in OUTDIR: done (its outputs are complete), failed (the "
                        "one-line reason), running (a live process of this machine), missing; then the shards to "
                        "rerun as an array specification (--array=3,7) in the task ids of the first run.")
    s.add_argument("outdir", type=Path, metavar="OUTDIR")
    s.add_argument("--json", action="store_true", help="machine-readable: every case, and rerun_shards / rerun_array")
    c.set_defaults(func=cmd_cohort)
