"""Benchmark: the reference's per-video computation (naive) vs this implementation, same supports and query.

  python bench/fewshot.py --quick      CPU: 2 CHAOS T2 supports + 1 query (synthetic volumes without ../shared/data),
                                       image size 128, 5 insertions, random-weight SAM2.1 Hiera-T
  python bench/fewshot.py              full size (GPU): 7 CHAOS supports + 1 query, image size 512 (MedSAM2's)
  python bench/fewshot.py --memory     GPU memory check: 10 synthetic supports of 512 x 512 x 100 and a query of
                                       the same size at image size 512, this implementation only; the last line is
                                       `peak_gpu_mb=<MB> within_16gb=<yes|no>` (--slices/--size shrink it for a
                                       CPU smoke run)
  add --checkpoint FILE --model NAME for real weights.
Each variant runs `sslmedsam2 pseudolabel` in its own process (peak memory is its own). Model building is not
timed. The last line is `speedup=<naive / ours> max_abs_diff=<largest probability difference>`.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from stages import Stages

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT.parent / "shared" / "data" / "chaos_t2"


def run_variant(args: argparse.Namespace) -> dict:
    import torch

    import sslmedsam2.fewshot.engine as engine
    import sslmedsam2.fewshot.job as job
    from sslmedsam2.fewshot.fusion import ProbabilityMean
    from sslmedsam2.fewshot.job import PseudoLabelOptions, run_pseudolabel
    from sslmedsam2.fewshot.tracking import SupportMemory
    from sslmedsam2.propagation.features import FeatureStore
    from sslmedsam2.settings import EngineSettings

    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    stages = Stages(sync=torch.cuda.synchronize if on_gpu else None)
    for owner, name, stage in ((engine, "build_predictor", "build"), (job, "load_volume", "read"),
                               (FeatureStore, "encode", "encode"), (SupportMemory, "__init__", "support memories"),
                               (engine, "track_queries_cached", "track"), (engine, "track_video_naive", "track"),
                               (ProbabilityMean, "add", "fuse"), (ProbabilityMean, "finish", "fuse"),
                               (job, "write_case", "write")):
        stages.wrap(owner, name, stage)
    estimates = [0]  # the memory model behind query batching, to compare with the measured peak
    query_bytes = engine.FewShotEngine.query_bytes

    def recorded(self, slices: int, videos: int) -> int:
        value = query_bytes(self, slices, videos)
        estimates[0] = max(estimates[0], value)
        return value

    engine.FewShotEngine.query_bytes = recorded
    work = Path(args.work)
    engine = EngineSettings(method="sam2", model=args.model, checkpoint=Path(args.checkpoint), device=args.device,
                            image_size=args.image_size, compile=args.compile)
    options = PseudoLabelOptions(support_images=work / "si", support_labels=work / "sl", query=work / "q",
                                 output=work / args.variant, engine=engine, insertions=args.insertions,
                                 naive=args.variant == "naive")
    start = time.perf_counter()
    compiling = []  # seconds of each compilation (--compile), from the engine's own line about it
    run_pseudolabel(options, log=lambda m: compiling.extend(
        float(s) for s in re.findall(r"^compiled the tracking step .* in ([0-9.]+) s", m)))
    seconds = time.perf_counter() - start - stages.get("build")
    split = {stage: stages.get(stage) for stage in ("read", "encode", "support memories", "track", "fuse", "write")}
    split["other"] = seconds - sum(split.values())
    # reserved (what the allocator took from the card) is what must fit; allocated is what tensors used
    gpu = torch.cuda.max_memory_reserved() / 2**20 if on_gpu else None
    used = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None
    return {"seconds": seconds, "stages": split, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": gpu, "peak_gpu_allocated_mb": used, "estimated_query_mb": estimates[0] / 2**20,
            "compile_seconds": sum(compiling)}


def phantom(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An abdomen-like volume: a liver-sized and a kidney-sized ellipsoid scaled to the shape, MR-like noise."""
    rng = np.random.default_rng(seed)
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    labels = np.zeros(shape, np.uint8)
    for value, centre, radii in ((1, (0.5, 0.45, 0.35), (0.3, 0.25, 0.22)), (2, (0.55, 0.6, 0.7), (0.15, 0.1, 0.08))):
        centre = np.array(centre) + rng.uniform(-0.03, 0.03, 3)
        inside = sum(((a.astype(np.float32) / n - c) / r) ** 2 for a, n, c, r in zip(axes, shape, centre, radii))
        labels[inside <= 1.0] = value
    image = rng.standard_normal(shape, dtype=np.float32)
    image *= 20
    image += 100
    image += np.array([0, 300, 180], np.float32)[labels]
    return image, labels


def prepare(args: argparse.Namespace, work: Path) -> str:
    """Folders si/, sl/, q/ under work (links to the shared data, or synthetic volumes); returns a description."""
    import SimpleITK as sitk

    for name in ("si", "sl", "q"):
        (work / name).mkdir()
    if args.memory:
        shape = (args.slices, args.size, args.size)
        for i in range(args.supports):  # uncompressed: gzip of noise would take most of the benchmark's time
            image, labels = phantom(shape, seed=i)
            sitk.WriteImage(sitk.GetImageFromArray(image), str(work / "si" / f"s{i}.nii"), useCompression=False)
            sitk.WriteImage(sitk.GetImageFromArray(labels), str(work / "sl" / f"s{i}.nii"), useCompression=False)
        sitk.WriteImage(sitk.GetImageFromArray(phantom(shape, seed=99)[0]), str(work / "q" / "query.nii"),
                        useCompression=False)
        return f"synthetic: {args.supports} supports and a query of {args.size} x {args.size} x {args.slices} (2 labels)"
    cases = sorted(p.name for p in (CHAOS / "images").glob("*.nii.gz")) if CHAOS.exists() else []
    if cases:
        supports, query = cases[: args.supports], cases[-1]
        for name in supports:
            (work / "si" / name).symlink_to(CHAOS / "images" / name)
            (work / "sl" / name).symlink_to(CHAOS / "labels" / name)
        (work / "q" / query).symlink_to(CHAOS / "images" / query)
        return f"CHAOS T2 supports {supports}, query {query} (4 labels)"
    sys.path.insert(0, str(ROOT / "Testing" / "Python"))
    from conftest import synthetic_case, to_image

    for i in range(args.supports):
        image, labels = synthetic_case((30, 96, 96), seed=i)
        sitk.WriteImage(to_image(image), str(work / "si" / f"s{i}.nii.gz"))
        sitk.WriteImage(to_image(labels), str(work / "sl" / f"s{i}.nii.gz"))
    image, _ = synthetic_case((32, 96, 96), seed=99)
    sitk.WriteImage(to_image(image), str(work / "q" / "query.nii.gz"))
    return f"synthetic: {args.supports} supports of 30 x 96 x 96, query 32 x 96 x 96 (2 labels)"


def fragile_share(folder: Path, margin: float) -> float:
    """Share of the labelled voxels whose label a probability change of `margin` could flip: the best label's
    probability within `margin` of the threshold, or of the second best. Random weights put most voxels there, so
    the label-map Dice between two runs that differ only by rounding is low without real weights."""
    import SimpleITK as sitk

    from sslmedsam2.fewshot.fusion import THRESHOLD

    fragile = labelled = 0
    for query in sorted({p.name.split(".prob_")[0] for p in folder.glob("*.prob_*.nii.gz")}):
        prob = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
                         for p in sorted(folder.glob(f"{query}.prob_*.nii.gz"))])
        top = np.sort(prob, axis=0)[::-1]
        best, second = top[0], top[1] if len(top) > 1 else np.zeros_like(top[0])
        candidate = best > THRESHOLD - margin
        near = (np.abs(best - THRESHOLD) <= margin) | (best - second <= 2 * margin)
        fragile += int((candidate & near).sum())
        labelled += int((best > THRESHOLD).sum())
    return fragile / max(labelled, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU run (a few minutes)")
    parser.add_argument("--model", default="sam2.1-tiny")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--supports", type=int)
    parser.add_argument("--insertions", type=int, default=5)
    parser.add_argument("--memory", action="store_true", help="GPU memory check (10 supports of 512 x 512 x 100)")
    parser.add_argument("--slices", type=int, default=100, help="--memory: slices per volume")
    parser.add_argument("--size", type=int, default=512, help="--memory: in-plane size of every volume")
    parser.add_argument("--compile", action="store_true", help="ours with --compile (its compilation time, part of "
                        "ours' time, is printed)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    args.image_size = args.image_size or (128 if args.quick else 512)
    args.supports = args.supports or (2 if args.quick else 10 if args.memory else 7)
    if args.quick:
        args.device = "cpu" if args.device == "auto" else args.device
    with tempfile.TemporaryDirectory(prefix="bench-fewshot-") as tmp:
        work = Path(tmp)
        description = prepare(args, work)
        if args.checkpoint is None:
            import torch

            from sslmedsam2.models import get_model
            from sslmedsam2.propagation.builder import build_predictor

            torch.manual_seed(0)
            args.checkpoint = str(work / "random.pt")
            torch.save({"model": build_predictor(get_model(args.model), None, "cpu", args.image_size).state_dict()},
                       args.checkpoint)
        results = {}
        for variant in ("ours",) if args.memory else ("naive", "ours"):
            cmd = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--model", args.model,
                   "--checkpoint", args.checkpoint, "--device", args.device, "--image-size", str(args.image_size),
                   "--insertions", str(args.insertions)] + (["--compile"] if args.compile else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{description}; model {args.model} at image size {args.image_size}, device {args.device}, "
              f"{args.insertions} insertions per support")
        for variant, r in results.items():
            gpu = (f", peak GPU {r['peak_gpu_mb']:.0f} MB reserved ({r['peak_gpu_allocated_mb']:.0f} MB allocated)"
                   if r["peak_gpu_mb"] is not None else "")
            estimate = (f"; estimated per query (features and memory banks) {r['estimated_query_mb']:.0f} MB"
                        if r["estimated_query_mb"] else "")
            compiled = f" (of which compiling {r['compile_seconds']:.1f} s)" if r["compile_seconds"] else ""
            print(f"{variant:>5}: {r['seconds']:.1f} s{compiled}, peak RAM {r['peak_rss_mb']:.0f} MB{gpu}{estimate}")
            print("       stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["stages"].items()))
        if args.memory:
            peak = results["ours"]["peak_gpu_mb"]
            print(f"peak_gpu_mb={peak:.0f} within_16gb={'yes' if peak <= 16 * 1024 else 'no'}" if peak is not None
                  else "peak_gpu_mb=n/a (not run on a GPU)")
            return
        import SimpleITK as sitk

        diff = 0.0
        for naive_prob in sorted((work / "naive").glob("*.prob_*.nii.gz")):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(naive_prob)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "ours" / naive_prob.name)))
            diff = max(diff, float(np.abs(a - b).max()))
        dice = []
        for query in sorted((work / "q").iterdir()):
            a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(work / v / query.name))) for v in ("naive", "ours"))
            for value in (v for v in np.union1d(np.unique(a), np.unique(b)) if v):
                dice.append(2 * ((a == value) & (b == value)).sum() / max((a == value).sum() + (b == value).sum(), 1))
        print(f"label maps, naive vs ours: mean dice over labels {np.mean(dice) if dice else 1.0:.5f}; "
              f"{100 * fragile_share(work / 'ours', diff):.1f} % of ours' labelled voxels are within max_abs_diff of "
              "the threshold or of another label (a change that small can flip them)")
        print(f"speedup={results['naive']['seconds'] / results['ours']['seconds']:.2f} max_abs_diff={diff:.2e}")


if __name__ == "__main__":
    main()
