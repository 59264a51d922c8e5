"""Benchmark: a small pseudo-label cohort as 1 shard against 2 shards run side by side, as array tasks.

  python bench/cohort.py                 6 synthetic queries of 16 x 64 x 64, 1 support, random-weight SAM2.1
                                         Hiera-T at image size 128, 2 insertions, CPU
  --queries N --insertions K --image-size N --device cpu|cuda --threads T (torch threads per process; default:
  torch's own choice, every core in each process) --checkpoint FILE --model NAME (real weights)

Each run is `sslmedsam2 pseudolabel` processes started as a scheduler starts array tasks (SLURM_ARRAY_TASK_ID,
_MIN, _MAX, _COUNT set, no --shard), into a fresh output folder; wall time from the first start to the last end,
model building and imports included (each shard pays them). The two results are checked to be the same label
maps. What it shows on a machine with few cores is the ratio, not a figure to assert: two shards share the cores
that one shard's torch already uses. The last line is `one_shard_s=<s> two_shards_s=<s> ratio=<one / two>`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 64, 64)  # slices, rows, columns of every synthetic volume


def prepare(work: Path, queries: int, supports: int) -> None:
    import SimpleITK as sitk

    sys.path.insert(0, str(ROOT / "Testing" / "Python"))
    from conftest import synthetic_case, to_image

    for name in ("si", "sl", "q"):
        (work / name).mkdir()
    for i in range(supports):
        image, labels = synthetic_case(SHAPE, seed=i)
        sitk.WriteImage(to_image(image), str(work / "si" / f"s{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(work / "sl" / f"s{i}.nii.gz"))
    for i in range(queries):
        image, _ = synthetic_case(SHAPE, seed=100 + i)
        sitk.WriteImage(to_image(image), str(work / "q" / f"q{i:02d}.nii.gz"))


def run_cohort(work: Path, out: str, shards: int, args: argparse.Namespace) -> float:
    """Start `shards` array tasks at once; the wall time until the last has ended."""
    argv = [sys.executable, "-m", "sslmedsam2", "pseudolabel", "--support-images", str(work / "si"),
            "--support-labels", str(work / "sl"), "--query", str(work / "q"), "-o", str(work / out),
            "--checkpoint", args.checkpoint, "--model", args.model, "--image-size", str(args.image_size),
            "--device", args.device, "--insertions", str(args.insertions)]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LSB_", "SGE_", "PBS_"))}
    if args.threads:
        base["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    jobs = []
    for task in range(1, shards + 1):
        array = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": str(shards),
                 "SLURM_ARRAY_TASK_COUNT": str(shards), "SLURM_ARRAY_TASK_STEP": "1"}
        jobs.append(subprocess.Popen(argv, env={**base, **array}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True))
    for job in jobs:
        _, err = job.communicate()
        if job.returncode:
            sys.exit(f"a shard of {shards} failed:\n{err[-3000:]}")
    return time.perf_counter() - start


def same_results(a: Path, b: Path) -> bool:
    import SimpleITK as sitk

    names = sorted(p.name for p in a.glob("q*.nii.gz") if ".prob_" not in p.name and ".uncertainty" not in p.name)
    return bool(names) and all(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a / n))),
                                              sitk.GetArrayFromImage(sitk.ReadImage(str(b / n)))) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=6)
    parser.add_argument("--supports", type=int, default=1)
    parser.add_argument("--insertions", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads per process (OMP_NUM_THREADS)")
    parser.add_argument("--model", default="sam2.1-tiny")
    parser.add_argument("--checkpoint")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cohort-") as tmp:
        work = Path(tmp)
        prepare(work, args.queries, args.supports)
        if args.checkpoint is None:
            import torch

            from sslmedsam2.models import get_model
            from sslmedsam2.propagation.builder import build_predictor

            torch.manual_seed(0)
            args.checkpoint = str(work / "random.pt")
            torch.save({"model": build_predictor(get_model(args.model), None, "cpu", args.image_size).state_dict()},
                       args.checkpoint)
        print(f"cohort: {args.queries} queries of {' x '.join(map(str, SHAPE))}, {args.supports} support(s), {args.model} at "
              f"{args.image_size}, {args.insertions} insertions, {args.device}, {os.cpu_count()} cores, threads per "
              f"process: {args.threads or 'torch default'}")
        one = run_cohort(work, "one", 1, args)
        print(f"1 shard:  {one:.1f} s")
        two = run_cohort(work, "two", 2, args)
        print(f"2 shards: {two:.1f} s (side by side)")
        print(f"same label maps: {'yes' if same_results(work / 'one', work / 'two') else 'NO'}")
        print(f"one_shard_s={one:.1f} two_shards_s={two:.1f} ratio={one / two:.2f}")


if __name__ == "__main__":
    main()
