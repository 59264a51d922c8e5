"""Are nnU-Net's key slices better than its average slice? (the selection behind `refine --sam2-from-nnunet`)

../shared/data/hippocampus (MSD Task04), the set-up of bench/ssl_hippocampus.py: K cases keep their labels (default 4),
U cases (default 8) get pseudo-labels from the interpolation baseline (every 5th coronal slice drawn). After round 0
of `refine` with a short nnU-Net schedule, nnU-Net predicts the U cases with its softmax confidence table, key slices
are chosen per label (`keyslices`: certainty from the table, continuity, spread), and each (slice, label) of the
prediction is scored against the true label: the mean Dice of the key slices vs the mean Dice of all slices that
carry the label in the prediction. Also shown: the selection without certainty, without continuity, and slices drawn
at random from the same parts (mean of 20 draws).
With --checkpoint (real SAM2 weights), round 0 also runs the SAM2 step (SAM2 propagates the key slices) and the
Dice of SAM2's pseudo-labels is compared with nnU-Net's, against the true labels.
  python bench/keyslices.py                                   2d, 20 epochs x 25 iterations (README's short schedule)
  python bench/keyslices.py --quick                           2d, 4 epochs x 10 iterations, 4 cases
  python bench/keyslices.py --checkpoint MedSAM2_latest.pt --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"
LABELS = [1, 2]


def slice_dice(pred: np.ndarray, truth: np.ndarray, label: int) -> np.ndarray:
    """Per slice of slice-first maps: Dice of `label` (nan where neither has it)."""
    a, b = pred == label, truth == label
    inter = (a & b).sum(axis=(1, 2))
    total = a.sum(axis=(1, 2)) + b.sum(axis=(1, 2))
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), np.nan)


def score_selection(cases: dict, choose) -> float:
    """Mean Dice over the (case, slice, label) that `choose(case) -> [(label, slice)]` picks."""
    scores = [cases[c]["dice"][label][z] for c in cases for label, z in choose(c)]
    return float(np.nanmean(scores)) if scores else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=4)
    parser.add_argument("--unlabelled", type=int, default=8)
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--per-label", type=int, default=None, help="default: keyslices' own (3)")
    parser.add_argument("--min-continuity", type=float, default=None, help="default: keyslices' own (0.6)")
    parser.add_argument("--quick", action="store_true", help="4 epochs x 10 iterations, 2 labelled and 4 unlabelled cases")
    parser.add_argument("--checkpoint", type=Path, help="real SAM2 weights: also run the SAM2 step and score it")
    parser.add_argument("--model", default=None, help="SAM2 model name of --checkpoint (default: propagate's)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--keep", type=Path, help="keep the work folder here (workspace, predictions)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.iterations, args.labelled, args.unlabelled = 4, 10, 2, 4
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: this benchmark needs the shared hippocampus data")
    multiprocessing.set_start_method("spawn", force=True)
    sys.path.insert(0, str(ROOT / "bench"))
    from ssl_hippocampus import build_workspace

    from sslmedsam2.propagation.device import resolve_device
    from sslmedsam2.labelmap.confidence import confidence_path, read_confidence
    from sslmedsam2.refine import nnunet
    from sslmedsam2.refine.keyslices import (DEFAULT_MIN_CONTINUITY, DEFAULT_PER_LABEL, certainty_from_table,
                                              select_key_slices)
    from sslmedsam2.refine.rounds import RefineJob, RefineOptions
    from sslmedsam2.study.workspace import Workspace
    from sslmedsam2.volume import slice_axis

    per_label = args.per_label or DEFAULT_PER_LABEL
    min_cont = DEFAULT_MIN_CONTINUITY if args.min_continuity is None else args.min_continuity
    device = str(resolve_device(args.device))
    names = sorted(p.name[: -len(".nii.gz")] for p in (DATA / "images").glob("*.nii.gz"))
    labelled, unlabelled = names[: args.labelled], names[args.labelled: args.labelled + args.unlabelled]
    keep = args.keep
    with (contextlib.nullcontext(str(keep)) if keep else tempfile.TemporaryDirectory(prefix="bench-keys-")) as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ws_path = work / "ws"
        started = time.perf_counter()
        with open(work / "nnunet.log", "a") as log, contextlib.redirect_stdout(log):
            if not ws_path.exists():
                build_workspace(ws_path, labelled, unlabelled, work)
            options = RefineOptions(rounds=1, configuration=args.configuration, epochs=args.epochs,
                                    iterations=args.iterations, val_iterations=5, device=device, convergence=1.0,
                                    sam2_from_nnunet=args.checkpoint is not None,
                                    sam2_checkpoint=str(args.checkpoint) if args.checkpoint else None,
                                    sam2_model=args.model, sam2_image_size=args.image_size,
                                    key_slices=per_label, min_continuity=min_cont)
            ws = Workspace.open(ws_path)
            RefineJob(ws, options).run()
            round_seconds = time.perf_counter() - started
            nnunet.use_folders(ws_path / "refine" / "nnunet")
            predicted = work / "predicted"
            nnunet.predict(0, args.configuration, "all", device, [ws.file(c, "image") for c in unlabelled],
                           [predicted / f"{c}.nii.gz" for c in unlabelled], confidence_axis="coronal")
        cases = {}
        for c in unlabelled:
            image = sitk.ReadImage(str(predicted / f"{c}.nii.gz"))
            axis = slice_axis(image, "coronal")
            pred = np.moveaxis(sitk.GetArrayFromImage(image), axis, 0)
            truth = np.moveaxis(sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labels" / f"{c}.nii.gz"))), axis, 0)
            truth = truth.astype(np.uint8)
            certainty = certainty_from_table(read_confidence(confidence_path(predicted / f"{c}.nii.gz")))
            cases[c] = {"pred": pred, "truth": truth, "certainty": certainty, "axis": axis,
                        "dice": {label: slice_dice(pred, truth, label) for label in LABELS}}

        def keys(c, **kw):
            settings = {"per_label": per_label, "min_continuity": min_cont, "certainty": cases[c]["certainty"], **kw}
            return [(k.label, k.slice) for k in select_key_slices(cases[c]["pred"], label_values=LABELS, **settings)]

        def all_slices(c):
            return [(label, int(z)) for label in LABELS for z in np.flatnonzero((cases[c]["pred"] == label).any(axis=(1, 2)))]

        def random_in_parts(seed):
            rng = np.random.default_rng(seed)

            def choose(c):
                out = []
                for label in LABELS:
                    present = np.flatnonzero((cases[c]["pred"] == label).any(axis=(1, 2)))
                    if len(present):
                        for part in np.array_split(np.arange(present[0], present[-1] + 1), per_label):
                            if len(part):
                                out.append((label, int(rng.choice(part))))
                return out
            return choose

        report = {"device": device, "schedule": {k: str(v) for k, v in vars(args).items()},
                  "per_label": per_label, "min_continuity": min_cont, "round0_seconds": round(round_seconds, 1)}
        report["all_slices"] = score_selection(cases, all_slices)
        report["key_slices"] = score_selection(cases, keys)
        report["key_slices_count"] = sum(len(keys(c)) for c in cases)
        report["no_certainty"] = score_selection(cases, lambda c: keys(c, certainty=None))
        report["no_continuity"] = score_selection(cases, lambda c: keys(c, min_continuity=0.0))
        report["random_in_parts"] = float(np.mean([score_selection(cases, random_in_parts(s)) for s in range(20)]))
        report["ratio"] = report["key_slices"] / report["all_slices"]
        if args.checkpoint is not None:
            from sslmedsam2.metrics.surface import mean_dice

            sam2_dir = ws_path / "refine" / "rounds" / "round_00" / "sam2"
            truth = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labels" / f"{c}.nii.gz"))).astype(np.uint8)
                     for c in unlabelled}
            report["nnunet_case_dice"] = float(np.mean([mean_dice(sitk.GetArrayFromImage(sitk.ReadImage(
                str(predicted / f"{c}.nii.gz"))), truth[c], LABELS) for c in unlabelled]))
            report["sam2_case_dice"] = float(np.mean([mean_dice(sitk.GetArrayFromImage(sitk.ReadImage(
                str(sam2_dir / f"{c}.nii.gz"))), truth[c], LABELS) for c in unlabelled]))
            report["sources"] = json.loads((ws_path / "refine" / "rounds" / "round_00" / "round.json").read_text())["sources"]
    print(json.dumps(report, indent=2))
    print(f"{len(unlabelled)} cases, round 0 in {report['round0_seconds']:.0f} s; per-slice Dice against the true labels:")
    print(f"  all slices of the prediction: {report['all_slices']:.3f}")
    print(f"  key slices ({report['key_slices_count']}, {per_label} per label, continuity >= {min_cont}): "
          f"{report['key_slices']:.3f}  ratio {report['ratio']:.3f}")
    print(f"  without certainty {report['no_certainty']:.3f}, without continuity {report['no_continuity']:.3f}, "
          f"random slice per part {report['random_in_parts']:.3f}")
    if args.checkpoint is not None:
        print(f"  case Dice: nnU-Net {report['nnunet_case_dice']:.3f}, SAM2 from its key slices "
              f"{report['sam2_case_dice']:.3f}; slices won {report['sources']}")


if __name__ == "__main__":
    main()
