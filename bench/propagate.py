"""Benchmark: this pipeline end to end vs the stock SAM2 video predictor fed JPEG files (the peers' route).

Same volume, weights and seeds. Each variant runs in its own process so peak memory is its own.
  python bench/propagate.py                      # CHAOS T2 case 2 (liver) if ../shared/data exists, else the sample
  python bench/propagate.py --image-size 1024 --device cuda --checkpoint sam2.1_hiera_tiny.pt
  python bench/propagate.py --device cuda --image-size 512 --model medsam2 --synthetic-slices 300
Without --checkpoint the weights are random (same architecture and cost as the real model).
Prints one line per variant, the stages of ours (read, frames, encode, track, fuse + confidence, write) and a
summary: overhead = end to end / SAM2's own time (encoding + tracking).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
from stages import Stages

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT.parent / "shared" / "data" / "chaos_t2"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gpu_peak_mb(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def run_ours(args: argparse.Namespace, sequential: bool = False) -> dict:
    """The pipeline, file in, file out; `sequential`: without cached features, so each label and pass is tracked
    one step at a time by sam2's own code (the reference the batched tracking must equal)."""
    from sslmedsam2 import pipeline
    from sslmedsam2.propagation import builder as loader
    from sslmedsam2.propagation.device import resolve_device
    from sslmedsam2.propagation import tracker as session
    import torch

    from sslmedsam2.propagation.features import FeatureStore

    if sequential:
        session.feature_device = lambda *a: None

    device = str(resolve_device(args.device))
    stages = Stages(sync=torch.cuda.synchronize if device.startswith("cuda") else None)
    for owner, name, stage in ((session, "run_passes", "track"), (session, "fuse", "fuse"),
                               (loader, "build_predictor", "build"), (pipeline, "load_case", "read"),
                               (pipeline, "to_uint8", "frames"), (FeatureStore, "encode", "encode")):
        stages.wrap(owner, name, stage)
    options = pipeline.PropagateOptions(method="sam2", model=args.model, checkpoint=Path(args.checkpoint),
                                        device=args.device, image_size=args.image_size, axis=args.axis,
                                        compile=args.compile and not sequential)
    name = "sequential" if sequential else "ours"
    first_run = None
    if options.compile:  # one run compiles; the measured run reuses the predictor, as a server would
        from sslmedsam2.models import get_model

        built = loader.build_predictor(get_model(args.model), Path(args.checkpoint), device, args.image_size,
                                       compile=True, say=lambda m: print(m, file=sys.stderr))
        setattr(loader, "build_predictor", lambda *a, **k: built)
        start = time.perf_counter()
        pipeline.run_propagate(Path(args.image), Path(args.seeds), Path(args.work) / f"{name}.nii.gz", options,
                               log=lambda m: None)
        first_run = time.perf_counter() - start
        stages.seconds.clear()
    start = time.perf_counter()
    with _profiled(args.profile, device):
        pipeline.run_propagate(Path(args.image), Path(args.seeds), Path(args.work) / f"{name}.nii.gz", options,
                               log=lambda m: None)
    # model building costs the same in both routes and is not part of the comparison
    total = time.perf_counter() - start - stages.get("build")
    seconds = {stage: stages.get(stage) for stage in ("read", "frames", "encode", "track", "fuse")}
    seconds["write"] = total - sum(seconds.values())
    return {"variant": name, "seconds": total, "model_seconds": seconds["encode"] + seconds["track"],
            "stages": seconds, "peak_rss_mb": _peak_rss_mb(), "peak_gpu_mb": _gpu_peak_mb(device),
            "first_run_seconds": first_run}


@contextlib.contextmanager
def _profiled(path: str | None, device: str):
    """torch.profiler around the run when `path` is set: operator tables (by GPU and by host time) and counts of
    the host calls that cost per-step latency (kernel launches, copies, synchronisations) written to `path`."""
    if not path:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    syncs: collections.Counter = collections.Counter()
    if device.startswith("cuda"):  # where the host waits for the GPU: each synchronising call, by its callers
        def on_warning(message, *args, **kwargs):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
            syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

        warnings.showwarning = on_warning
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
    with profile(activities=activities) as prof:
        yield
    if device.startswith("cuda"):
        torch.cuda.set_sync_debug_mode("default")
    events = prof.key_averages()
    counted = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaStreamSynchronize",
               "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense", "aten::to", "aten::copy_",
               "aten::empty", "aten::nonzero")
    counts = {e.key: e.count for e in events if e.key in counted}
    with open(path, "w") as out:
        out.write(f"calls: {json.dumps(counts)}\n\nsynchronising calls:\n")
        out.writelines(f"{n:6d} {where}\n" for where, n in syncs.most_common(25))
        out.write("\n")
        for key in (("self_cuda_time_total", "self_cpu_time_total") if len(activities) > 1 else ("self_cpu_time_total",)):
            out.write(events.table(sort_by=key, row_limit=45) + "\n\n")


def _build(args: argparse.Namespace, device: str):
    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor

    return build_predictor(get_model(args.model), Path(args.checkpoint), device, args.image_size)


def run_jpeg(args: argparse.Namespace) -> dict:
    """The usual route: frames written as JPEG files, sam2's init_state loads them, propagate_in_video both ways."""
    import SimpleITK as sitk
    import torch
    from PIL import Image

    from sslmedsam2.frames import IntensitySpec, to_uint8
    from sslmedsam2.propagation.device import resolve_device
    from sslmedsam2.volume import slice_axis

    device = str(resolve_device(args.device))
    predictor = _build(args, device)
    model_seconds = 0.0
    start = time.perf_counter()
    image = sitk.ReadImage(args.image, sitk.sitkFloat32)
    axis = slice_axis(image, args.axis)
    volume = np.moveaxis(sitk.GetArrayFromImage(image), axis, 0)
    seeds = np.moveaxis(sitk.GetArrayFromImage(sitk.ReadImage(args.seeds)), axis, 0)
    frames = to_uint8(volume, IntensitySpec())
    folder = Path(args.work) / "jpeg"
    folder.mkdir()
    for i, s in enumerate(frames):
        Image.fromarray(s).save(folder / f"{i:05d}.jpg")
    labels = [int(v) for v in np.unique(seeds) if v]
    drawn = {label: [int(z) for z in np.flatnonzero((seeds == label).any(axis=(1, 2)))] for label in labels}
    first, last = min(min(v) for v in drawn.values()), max(max(v) for v in drawn.values())
    n, h, w = frames.shape
    logits = torch.zeros(len(labels), n, h, w)
    counts = torch.zeros(n)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        state = predictor.init_state(str(folder))
        for reverse, start_frame in ((False, first), (True, last)):
            tick = time.perf_counter()
            predictor.reset_state(state)
            for label in labels:
                for z in drawn[label]:
                    predictor.add_new_mask(state, z, label, seeds[z] == label)
            for z, _, masks in predictor.propagate_in_video(state, start_frame_idx=start_frame, reverse=reverse):
                logits[:, z] += masks[:, 0].float().cpu()
                counts[z] += 1
            model_seconds += time.perf_counter() - tick
    fused = logits / counts.clamp(min=1)[None, :, None, None]
    best, index = fused.max(0)
    out = torch.where(best > 0, torch.tensor(labels)[index], 0).numpy().astype(np.uint8)
    result = sitk.GetImageFromArray(np.moveaxis(out, 0, axis))
    result.CopyInformation(image)
    sitk.WriteImage(result, str(Path(args.work) / "jpeg.nii.gz"))
    total = time.perf_counter() - start
    return {"variant": "jpeg", "seconds": total, "model_seconds": model_seconds, "peak_rss_mb": _peak_rss_mb(),
            "peak_gpu_mb": _gpu_peak_mb(device)}


def synthetic_volume(work: Path, slices: int, dtype: str = "float32") -> tuple[str, str]:
    """A 512 x 512 x N MR-like volume with one ellipsoid organ, as the GPU figures of the README were measured on;
    `dtype` int16 stores it rounded, as scanners store images (half the bytes to read and decompress)."""
    import SimpleITK as sitk

    z, y, x = np.ogrid[:slices, :512, :512]
    organ = ((z - slices / 2) / (slices * 0.35)) ** 2 + ((y - 250) / 120) ** 2 + ((x - 260) / 150) ** 2 <= 1
    rng = np.random.default_rng(0)
    image = (100 + 20 * rng.standard_normal((slices, 512, 512)) + 250 * organ).astype(np.float32)
    if dtype == "int16":
        image = np.rint(image).astype(np.int16)
    paths = str(work / "synthetic.nii.gz"), str(work / "synthetic_label.nii.gz")
    for array, path in zip((image, organ.astype(np.uint8)), paths):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing((0.8, 0.8, 2.0))
        sitk.WriteImage(volume, path)
    return paths


def prepare(args: argparse.Namespace, work: Path) -> None:
    """Seeds (3 slices per label: both ends of its extent and the middle) and a random-weight checkpoint if needed."""
    import SimpleITK as sitk

    from sslmedsam2.volume import slice_axis

    label = sitk.ReadImage(args.label)
    axis = slice_axis(label, args.axis)
    full = np.moveaxis(sitk.GetArrayFromImage(label).astype(np.uint8), axis, 0)
    seeds = np.zeros_like(full)
    for value in args.labels or [int(v) for v in np.unique(full) if v]:
        present = np.flatnonzero((full == value).any(axis=(1, 2)))
        for z in {present[0], present[len(present) // 2], present[-1]}:
            seeds[z][full[z] == value] = value
    image = sitk.GetImageFromArray(np.moveaxis(seeds, 0, axis))
    image.CopyInformation(label)
    args.seeds = str(work / "seeds.nii.gz")
    sitk.WriteImage(image, args.seeds)
    if args.checkpoint is None:
        import torch

        from sslmedsam2.models import get_model
        from sslmedsam2.propagation.builder import build_predictor

        torch.manual_seed(0)
        predictor = build_predictor(get_model(args.model), None, "cpu", args.image_size)
        args.checkpoint = str(work / "random.pt")
        torch.save({"model": predictor.state_dict()}, args.checkpoint)


def batched_vs_sequential(work: Path) -> str:
    """Label-map Dice and the largest difference in the confidence table between the batched tracking (ours) and
    sam2's one-track-at-a-time tracking: equal on CPU in float32, rounding apart under bf16 on a GPU."""
    import csv

    import SimpleITK as sitk

    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"{n}.nii.gz"))) for n in ("ours", "sequential"))
    labels = [v for v in np.union1d(np.unique(a), np.unique(b)) if v]
    dice = np.mean([2 * ((a == v) & (b == v)).sum() / max((a == v).sum() + (b == v).sum(), 1) for v in labels])
    rows = [list(csv.DictReader(open(work / f"{n}.confidence.csv"))) for n in ("ours", "sequential")]
    diff = max((abs(float(x[k]) - float(y[k])) for x, y in zip(*rows) for k in ("presence", "certainty", "confidence")
                if x[k] and y[k]), default=0.0)
    return f"batched vs sequential: label-map dice={dice:.5f} max_abs_diff={diff:.2e} (confidence table)"


def volume_size(path: str) -> tuple[int, int, int]:
    """The image's size from its header alone (the synthetic volume is 300 MB)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader.GetSize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_case = CHAOS / "images" / "chaos_t2_2.nii.gz"
    if default_case.exists():
        image, label, labels = default_case, CHAOS / "labels" / "chaos_t2_2.nii.gz", [1]
    else:
        sample = ROOT / "src" / "sslmedsam2" / "sample"
        image, label, labels = sample / "hippocampus_001_image.nii.gz", sample / "hippocampus_001_label.nii.gz", None
    parser.add_argument("--image", default=str(image))
    parser.add_argument("--label", default=str(label), help="full label map; seeds are taken from it")
    parser.add_argument("--labels", type=int, nargs="*", default=labels, help="labels to propagate (default: liver)")
    parser.add_argument("--axis", default="axial")
    parser.add_argument("--model", default="sam2.1-tiny")
    parser.add_argument("--checkpoint")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--synthetic-slices", type=int, help="use a synthetic 512 x 512 x N volume (one label)")
    parser.add_argument("--synthetic-dtype", choices=("float32", "int16"), default="float32",
                        help="how the synthetic volume is stored (default float32, as the README's GPU figures)")
    parser.add_argument("--profile", help="run ours once under torch.profiler and write its tables to this file")
    parser.add_argument("--only-ours", action="store_true", help="run this pipeline alone (no reference routes)")
    parser.add_argument("--compile", action="store_true", help="ours with --compile: one run compiles (its time is "
                        "printed), the measured run reuses the compiled step, as a long-lived server does")
    parser.add_argument("--variant", choices=("ours", "jpeg", "sequential"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_jpeg(args) if args.variant == "jpeg" else run_ours(args, args.variant == "sequential")))
        return
    with tempfile.TemporaryDirectory(prefix="bench-propagate-") as tmp:
        work = Path(tmp)
        if args.synthetic_slices:
            args.image, args.label = synthetic_volume(work, args.synthetic_slices, args.synthetic_dtype)
            args.labels = [1]
        prepare(args, work)
        results = {}
        for variant in ("ours",) if args.profile or args.only_ours else ("jpeg", "sequential", "ours"):
            cmd = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--seeds", args.seeds,
                   "--image", args.image, "--axis", args.axis, "--model", args.model, "--checkpoint", args.checkpoint,
                   "--image-size", str(args.image_size), "--device", args.device]
            extra = (["--profile", args.profile] if args.profile else []) + (["--compile"] if args.compile else [])
            done = subprocess.run(cmd + extra, capture_output=True, text=True, check=True)
            results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        if results["ours"]["first_run_seconds"] is not None:
            print(f"--compile: the first run, compiling, took {results['ours']['first_run_seconds']:.2f} s; the "
                  "figures below are of the second")
        if args.profile or args.only_ours:
            r = results["ours"]
            print(f"ours: end to end {r['seconds']:.2f} s, {volume_size(args.image)[2] / r['seconds']:.2f} slices/s, "
                  f"stages " + ", ".join(f"{k} {v:.2f} s" for k, v in r["stages"].items())
                  + (f"; tables in {args.profile}" if args.profile else ""))
            return
        n = volume_size(args.image)
        ours, jpeg = results["ours"], results["jpeg"]
        print(f"volume {Path(args.image).name} {n}, model {args.model} (image size {args.image_size}), "
              f"device {args.device}, labels {args.labels or 'all'}")
        for r in (jpeg, results["sequential"], ours):
            gpu = f", peak GPU {r['peak_gpu_mb']:.0f} MB" if r["peak_gpu_mb"] is not None else ""
            print(f"{r['variant']:>5}: end to end {r['seconds']:.2f} s, SAM2 tracking {r['model_seconds']:.2f} s, "
                  f"{n[2] / r['seconds']:.2f} slices/s, peak RAM {r['peak_rss_mb']:.0f} MB{gpu}")
        print(batched_vs_sequential(work))
        print("stages of ours: " + ", ".join(f"{k} {v:.2f} s" for k, v in ours["stages"].items()))
        print(f"overhead={ours['seconds'] / ours['model_seconds']:.3f} "
              f"speedup_vs_jpeg={jpeg['seconds'] / ours['seconds']:.2f}")


if __name__ == "__main__":
    main()
