"""Which cases a job takes: `--shard I/N`, or the array variables of the scheduler that started it.

Cases are sorted by file name (then path) and dealt round-robin: shard I of N takes cases I, I + N, I + 2N, ...
(1-based), so shards never overlap and together they are the cohort, whatever order the jobs run in.

Array variables read when there is no `--shard` (an explicit `--shard` always wins):

    SLURM    SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_MIN, _MAX, _COUNT, _STEP   (--array=1-N or 0-(N-1))
    LSF      LSB_JOBINDEX, LSB_JOBINDEX_END, LSB_JOBINDEX_STEP              (-J "name[1-N]": LSF counts from 1)
    SGE/UGE  SGE_TASK_ID, SGE_TASK_FIRST, SGE_TASK_LAST, SGE_TASK_STEPSIZE  (-t 1-N)
    PBS Pro  PBS_ARRAY_INDEX; Torque PBS_ARRAYID                           (the index only: no array size)

The number of shards N comes from a full array (first task 0 or 1, step 1: N = its size), or, once a shard has
run, from the output folder's cohort.json, which records N and the array's first index. So a rerun of some shards
(`--array=3,7`, whose own size is 2) keeps the split of the first run. A variable that is set but cannot be a
shard of this split is a one-line error, never a silent run of the whole cohort.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sslmedsam2.errors import UserError

WHOLE = "no --shard and no array job: every case"  # the source of the default shard, which binds no later run


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`; `source` says where it came from; `base` is the scheduler's first task
    id (0 or 1), so that shard I is array task I - 1 + base."""

    index: int
    count: int
    source: str = "--shard"
    base: int = 1

    def task_id(self, index: int | None = None) -> int:
        return (self.index if index is None else index) - 1 + self.base

    def describe(self) -> str:
        return f"shard {self.index}/{self.count} ({self.source})"


@dataclass(frozen=True)
class ArrayTask:
    """What a scheduler's variables say about this job: its task id and, where the scheduler tells, the array's
    first and last task ids, size and step (None: not told)."""

    variable: str
    task: int
    first: int | None = None
    last: int | None = None
    size: int | None = None
    step: int = 1

    def is_full_array(self) -> bool:
        """Tasks first..last in steps of 1 from 0 or 1: the array of a first run, whose size is the number of shards."""
        if self.first not in (0, 1) or self.last is None or self.step != 1:
            return False
        return self.size is None or self.size == self.last - self.first + 1

    def shown(self) -> str:
        return f"{self.variable}={self.task}"


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r}: write it as I/N, e.g. 2/4") from None
    if not 1 <= index <= count:
        raise UserError(f"--shard {text}: I must be between 1 and N")
    return index, count


def sorted_cases(paths: Sequence[Path]) -> list[Path]:
    """The order shards are dealt from: by file name, then path."""
    return sorted(paths, key=lambda p: (Path(p).name, str(p)))


def shard_of(paths: Sequence[Path], shard: Shard | tuple[int, int]) -> list[Path]:
    """The cases of one shard: sorted (sorted_cases) and dealt round-robin."""
    index, count = (shard.index, shard.count) if isinstance(shard, Shard) else shard
    return sorted_cases(paths)[index - 1::count]


def shard_number(position: int, count: int) -> int:
    """The shard (1-based) that takes the case at `position` (0-based) of the sorted cases."""
    return position % count + 1


def _number(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r} is not a number: not an array task of a scheduler sslmedsam2 knows; "
                        "pass --shard I/N") from None


def array_task(env: Mapping[str, str] | None = None) -> ArrayTask | None:
    """This job's array task, from the first scheduler whose variables are set (SLURM, LSF, SGE, PBS Pro, Torque);
    None outside an array job."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_TASK_ID", "").strip():
        return ArrayTask("SLURM_ARRAY_TASK_ID", _number(env, "SLURM_ARRAY_TASK_ID"),
                         _number(env, "SLURM_ARRAY_TASK_MIN"), _number(env, "SLURM_ARRAY_TASK_MAX"),
                         _number(env, "SLURM_ARRAY_TASK_COUNT"), _number(env, "SLURM_ARRAY_TASK_STEP") or 1)
    if env.get("LSB_JOBINDEX", "").strip() not in ("", "0"):  # LSF sets 0 in a job that is no array
        return ArrayTask("LSB_JOBINDEX", _number(env, "LSB_JOBINDEX"), 1, _number(env, "LSB_JOBINDEX_END"), None,
                         _number(env, "LSB_JOBINDEX_STEP") or 1)
    if env.get("SGE_TASK_ID", "").strip() not in ("", "undefined"):
        return ArrayTask("SGE_TASK_ID", _number(env, "SGE_TASK_ID"), _number(env, "SGE_TASK_FIRST"),
                         _number(env, "SGE_TASK_LAST"), None, _number(env, "SGE_TASK_STEPSIZE") or 1)
    for name in ("PBS_ARRAY_INDEX", "PBS_ARRAYID"):
        if env.get(name, "").strip():
            return ArrayTask(name, _number(env, name))
    return None


def resolve_shard(explicit: tuple[int, int] | None, recorded: tuple[int, int] | None = None,
                  env: Mapping[str, str] | None = None) -> Shard:
    """The shard this job takes: `explicit` (--shard) if given, else the scheduler's array task, else the whole
    cohort. `recorded`: (N, first task id) of the output folder's earlier runs (cohort.json), if any."""
    base = recorded[1] if recorded else 1
    if explicit is not None:
        return Shard(explicit[0], explicit[1], "--shard", base)
    task = array_task(env)
    if task is None:
        return Shard(1, 1, WHOLE, base)
    if task.step < 1 or (task.size is not None and task.size < 1):
        raise UserError(f"{task.shown()}: the array's step or size is not a positive number; pass --shard I/N")
    if (task.first is not None and task.task < task.first) or (task.last is not None and task.task > task.last):
        raise UserError(f"{task.shown()} lies outside its own array ({task.first}-{task.last}); pass --shard I/N")
    if recorded is not None:
        count, base = recorded
        index = task.task - base + 1
        if not 1 <= index <= count:
            raise UserError(f"{task.shown()}: the output folder was split into {count} shards, array tasks "
                            f"{base}-{count - 1 + base} (cohort.json); pass --shard I/N to split it anew")
        if task.size is not None and task.size > count:
            raise UserError(f"{task.shown()}: an array of {task.size} tasks, but the output folder was split into "
                            f"{count} shards (cohort.json); pass --shard I/N to split it anew")
        return Shard(index, count, task.shown(), base)
    if not task.is_full_array():
        told = f"tasks {task.first}-{task.last}" if task.last is not None else "no array size"
        raise UserError(f"{task.shown()} ({told}, step {task.step}) does not say how many shards there are, and "
                        "no earlier run in the output folder does: run the array as 1-N (or 0-(N-1)), or pass "
                        f"--shard I/N, e.g. --shard ${task.variable}/N")
    return Shard(task.task - task.first + 1, task.last - task.first + 1, task.shown(), task.first)


def array_spec(numbers: Sequence[int]) -> str:
    """Task ids as an array specification schedulers take: [1, 2, 3, 7] -> '1-3,7'."""
    spans: list[list[int]] = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
