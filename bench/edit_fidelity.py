"""Benchmark: local edits against exact ones, edit by edit, as a clinician would make them.

On CHAOS T2 (../shared/data/chaos_t2, every volume and label): propagate from 3 drawn slices per label (both ends
of its extent and the middle), then correct 3 slices one at a time as a reviewer sorting by confidence would:
each time the lowest-confidence slice whose result differs from the truth, replaced by the truth (the label's
true mask there). Each correction is made twice from the same state, locally (the default) and exactly (every
slice again), and the simulation goes on from the local result. Per edit: both times, the slices re-tracked,
the agreement of the local with the exact result (label Dice over the volume, share of voxels that differ, the
largest per-slice difference), both results' Dice against the truth, and how the exact edit's change decays with
the distance from the corrected slice. The trade-off: speedup against agreement for several agreement windows.

Without --checkpoint the weights are random (the real SAM2.1 Hiera-T architecture): a random model carries almost
nothing through its memory, so the agreement and Dice figures then say little; speed and mechanism are real. With
real weights (--checkpoint) they are the fidelity figures.

  python bench/edit_fidelity.py --quick                     # 2 volumes, a few minutes on a 2-core CPU
  python bench/edit_fidelity.py --checkpoint MedSAM2_latest.pt --model medsam2 --image-size 512 --device cuda

Last line: edits=<n> retracked=<median share of slices> dice_local_exact=<median> dice_worst=<min>
speedup=<median exact/local>
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHAOS = ROOT.parent / "shared" / "data" / "chaos_t2"
sys.path.insert(0, str(ROOT / "src"))
WINDOWS = (1, 3, None, 16)  # agreeing slices before a stop; None: the model's num_maskmem


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over labels of the Dice of two label maps (1 where a label is in neither)."""
    labels = sorted(set(np.unique(a)) | set(np.unique(b)) - {0})
    scores = []
    for label in labels:
        x, y = a == label, b == label
        total = int(x.sum() + y.sum())
        scores.append(1.0 if total == 0 else 2 * int((x & y).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


def prompts_of(truth: np.ndarray) -> dict[int, np.ndarray]:
    """Each label drawn on 3 slices: both ends of its extent and the middle (labels drawn independently)."""
    planes: dict[int, np.ndarray] = {}
    for label in (int(v) for v in np.unique(truth) if v):
        present = np.flatnonzero((truth == label).any(axis=(1, 2)))
        for z in {int(present[0]), int(present[len(present) // 2]), int(present[-1])}:
            plane = planes.setdefault(z, np.zeros(truth.shape[1:], truth.dtype))
            plane[truth[z] == label] = label
    return planes


def next_correction(result, truth: np.ndarray, prompts: dict[int, np.ndarray]) -> int | None:
    """The lowest-confidence slice (any label) whose result differs from the truth and is not a prompt yet."""
    for row in sorted(result.confidence, key=lambda r: (r.confidence if r.confidence == r.confidence else 2.0,
                                                        r.slice, r.label)):
        if row.slice not in prompts and not np.array_equal(result.labels[row.slice], truth[row.slice]):
            return row.slice
    return None


def influence(before: np.ndarray, after: np.ndarray, z: int) -> dict[int, float]:
    """Per distance from the corrected slice: the largest share of a slice's voxels the exact edit changed."""
    out: dict[int, float] = {}
    for k in range(len(before)):
        changed = float((before[k] != after[k]).mean())
        out[abs(k - z)] = max(out.get(abs(k - z), 0.0), changed)
    return out


def run_volume(name: str, image_path: Path, label_path: Path, predictor, args, report: dict) -> None:
    import SimpleITK as sitk

    from sslmedsam2.frames import IntensitySpec
    from sslmedsam2.session.local import LocalSession
    from sslmedsam2.settings import EditRule
    from sslmedsam2.volume import read_image, read_label_map
    from sslmedsam2.volume.slices import SliceVolume

    image = read_image(image_path)
    volume = SliceVolume.from_image(image, "axial", IntensitySpec(), name)
    truth = np.ascontiguousarray(volume.grid.to_slices(sitk.GetArrayFromImage(read_label_map(label_path))))
    session = LocalSession(volume, predictor)
    prompts = prompts_of(truth)
    start = time.perf_counter()
    session.propagate(prompts)
    print(f"{name}: {truth.shape[0]} slices, labels {sorted(int(v) for v in set(np.unique(truth)) - {0})}, first propagation "
          f"{time.perf_counter() - start:.1f} s, Dice {dice(session.result.labels, truth):.4f}", flush=True)
    for step in range(args.edits):
        z = next_correction(session.result, truth, session.prompts)
        if z is None:
            break
        before = session.result.labels
        edit = {z: truth[z]}
        times, results = {}, {}
        for window in WINDOWS:
            session.rule = EditRule(slices=window)
            start = time.perf_counter()
            results[window] = session.propagate(edit, replace=False)
            times[window] = time.perf_counter() - start
            session.undo()
        session.rule = EditRule()
        start = time.perf_counter()
        exact = session.propagate(edit, replace=False, mode="exact")
        t_exact = time.perf_counter() - start
        session.undo()
        local = session.propagate(edit, replace=False)  # the simulation goes on from the local result
        n = len(local.labels)
        differ = local.labels != exact.labels
        row = {"volume": name, "slice": z, "local_s": times[None], "exact_s": t_exact,
               "retracked": len(local.retracked) / n, "dice_local_exact": dice(local.labels, exact.labels),
               "voxels_differ": float(differ.mean()), "worst_slice": float(differ.reshape(n, -1).mean(1).max()),
               "dice_local_truth": dice(local.labels, truth), "dice_exact_truth": dice(exact.labels, truth),
               "windows": {w: (t_exact / times[w], dice(results[w].labels, exact.labels),
                               len(results[w].retracked) / n) for w in WINDOWS}}
        report["edits"].append(row)
        for distance, share in influence(before, exact.labels, z).items():
            report["influence"].setdefault(distance, []).append(share)
        print(f"  edit {step + 1}: slice {z}: local {row['local_s']:.2f} s (re-tracked {len(local.retracked)} of {n}), "
              f"exact {t_exact:.2f} s; local vs exact Dice {row['dice_local_exact']:.4f}, voxels differ "
              f"{row['voxels_differ']:.2%}, worst slice {row['worst_slice']:.2%}; Dice vs truth local "
              f"{row['dice_local_truth']:.4f}, exact {row['dice_exact_truth']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=CHAOS, help="a folder with images/ and labels/")
    parser.add_argument("--quick", action="store_true", help="the first 2 volumes only")
    parser.add_argument("--edits", type=int, default=3, help="corrections per volume (default 3)")
    parser.add_argument("--model", default="sam2.1-tiny")
    parser.add_argument("--checkpoint", help="real weights (without: random ones, see above)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not (args.data / "images").is_dir():
        raise SystemExit(f"{args.data}: no images/ folder (CHAOS T2 sits in ../shared/data beside the project)")

    import torch

    from sslmedsam2.models import get_model
    from sslmedsam2.propagation.builder import build_predictor
    from sslmedsam2.propagation.device import resolve_device

    torch.manual_seed(0)
    predictor = build_predictor(get_model(args.model), args.checkpoint, resolve_device(args.device), args.image_size)
    cases = sorted((args.data / "images").glob("*.nii.gz"))[: 2 if args.quick else None]
    print(f"{len(cases)} volumes, {args.model} at {args.image_size} on {args.device}, "
          f"{'weights ' + args.checkpoint if args.checkpoint else 'random weights'}; windows {WINDOWS} "
          f"(None: num_maskmem {predictor.num_maskmem})", flush=True)
    report: dict = {"edits": [], "influence": {}}
    for path in cases:
        run_volume(path.name.split(".")[0], path, args.data / "labels" / path.name, predictor, args, report)
    edits = report["edits"]
    if not edits:
        raise SystemExit("no edit was needed")
    print("influence of an exact edit (largest share of a slice's voxels changed, median over edits), by distance:")
    print("  " + ", ".join(f"{d}: {statistics.median(v):.2%}" for d, v in sorted(report["influence"].items())
                           if d <= 12))
    print("trade-off per agreement window (median speedup exact/local, median and worst Dice local vs exact, "
          "median share re-tracked):")
    for window in WINDOWS:
        speed = [e["windows"][window][0] for e in edits]
        agree = [e["windows"][window][1] for e in edits]
        share = [e["windows"][window][2] for e in edits]
        print(f"  window {window if window is not None else 'num_maskmem'}: speedup {statistics.median(speed):.1f}, "
              f"Dice {statistics.median(agree):.4f} (worst {min(agree):.4f}), re-tracked {statistics.median(share):.0%}")
    print(f"Dice vs truth, median: local {statistics.median(e['dice_local_truth'] for e in edits):.4f}, exact "
          f"{statistics.median(e['dice_exact_truth'] for e in edits):.4f}; voxels differing local vs exact: median "
          f"{statistics.median(e['voxels_differ'] for e in edits):.3%}, worst slice "
          f"{max(e['worst_slice'] for e in edits):.2%}")
    print(f"edits={len(edits)} retracked={statistics.median(e['retracked'] for e in edits):.2f} "
          f"dice_local_exact={statistics.median(e['dice_local_exact'] for e in edits):.4f} "
          f"dice_worst={min(e['dice_local_exact'] for e in edits):.4f} "
          f"speedup={statistics.median(e['exact_s'] / e['local_s'] for e in edits):.1f}")


if __name__ == "__main__":
    main()
