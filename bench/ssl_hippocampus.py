"""Semi-supervised refinement on real MRI: does iterating nnU-Net on pseudo-labels beat nnU-Net on K labels alone?

../shared/data/hippocampus (MSD Task04): K cases keep their labels (default 4), U cases are used without theirs
(default 8) with pseudo-labels from the interpolation baseline (every 5th coronal slice of each structure drawn:
those slices are "seed" in the review, so they stay fixed), and H further cases (default 8) are held out. Reports
Dice on the held-out cases per round, against nnU-Net trained on the K labelled cases alone, and the wall time of
warm-started vs from-scratch rounds.
  python bench/ssl_hippocampus.py                    short CPU schedule (3d_fullres, 10 epochs x 10 iterations)
  python bench/ssl_hippocampus.py --epochs 250 --iterations 250 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hippocampus"


def heldout_dice(round_: int, configuration: str, fold: str, device: str, cases: list[str], work: Path) -> float:
    from sslmedsam2.metrics.surface import mean_dice
    from sslmedsam2.refine import nnunet

    out = work / f"heldout_r{round_}"
    images = [DATA / "images" / f"{c}.nii.gz" for c in cases]
    nnunet.predict(round_, configuration, fold, device, images, [out / f"{c}.nii.gz" for c in cases])
    scores = [mean_dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{c}.nii.gz"))),
                        sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "labels" / f"{c}.nii.gz"))).astype(np.uint8), [1, 2])
              for c in cases]
    return float(np.mean(scores))


def round_seconds(events_file: Path) -> list[float]:
    """Wall time of each round, from its export to its round event."""
    from sslmedsam2.refine.events import read_events

    events, _ = read_events(events_file)
    starts = {e["round"]: e["time"] for e in events if e["event"] == "stage" and e["stage"] == "export"}
    ends = {e["round"]: e["time"] for e in events if e["event"] == "round"}
    return [(datetime.fromisoformat(ends[r]) - datetime.fromisoformat(starts[r])).total_seconds() for r in sorted(ends)]


def build_workspace(ws: Path, labelled: list[str], unlabelled: list[str], work: Path) -> None:
    from sslmedsam2.labelmap.confidence import write_confidence
    from sslmedsam2.interpolation.contour import interpolate_between_seeds
    from sslmedsam2.labelmap.seeds import Seeds
    from sslmedsam2.study.workspace import add_case, init_workspace
    from sslmedsam2.pipeline import load_case

    workspace = init_workspace(ws, {"anterior": 1, "posterior": 2}, axis="coronal")
    for case in labelled:
        add_case(workspace, DATA / "images" / f"{case}.nii.gz", label=DATA / "labels" / f"{case}.nii.gz")
    for case in unlabelled:
        full = load_case(DATA / "images" / f"{case}.nii.gz", DATA / "labels" / f"{case}.nii.gz", "coronal")
        seeds = Seeds.every_nth_slice(full.seeds.labels_map, 5)
        result = interpolate_between_seeds(seeds)
        pseudo, table = work / f"{case}_pseudo.nii.gz", work / f"{case}.confidence.csv"
        sitk.WriteImage(full.to_image(result.labels), str(pseudo))
        write_confidence(result.confidence, table)
        add_case(workspace, DATA / "images" / f"{case}.nii.gz", pseudo=pseudo, review_from=table,
                 eval_label=DATA / "labels" / f"{case}.nii.gz")


def labelled_only(labelled: list[str], args, device: str, heldout: list[str], work: Path) -> tuple[float, float]:
    """nnU-Net on the K labelled cases alone (dataset id of 'round' 90 in its own folders)."""
    from sslmedsam2.refine import nnunet
    from sslmedsam2.refine.export import export_round
    from sslmedsam2.study.workspace import Workspace, add_case, init_workspace

    ws = init_workspace(work / "ws_labelled", {"anterior": 1, "posterior": 2}, axis="coronal")
    for case in labelled:
        add_case(ws, DATA / "images" / f"{case}.nii.gz", label=DATA / "labels" / f"{case}.nii.gz")
    nnunet.use_folders(work / "nnunet_labelled")
    import os

    start = time.perf_counter()
    export_round(Workspace.open(ws.root), Path(os.environ["nnUNet_raw"]) / nnunet.dataset_name(90), {}, "none")
    nnunet.plan_and_preprocess(90, args.configuration)
    nnunet.train(90, args.configuration, "all", device, args.epochs, args.iterations, 5, lambda e: None, lambda: False)
    seconds = time.perf_counter() - start
    return heldout_dice(90, args.configuration, "all", device, heldout, work), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=int, default=4)
    parser.add_argument("--unlabelled", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warm-epochs", type=int, default=3)
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is absent: this benchmark needs the shared hippocampus data")
    import contextlib
    import multiprocessing

    multiprocessing.set_start_method("spawn", force=True)
    from sslmedsam2.propagation.device import resolve_device
    from sslmedsam2.refine import nnunet
    from sslmedsam2.refine.rounds import RefineJob, RefineOptions
    from sslmedsam2.study.workspace import Workspace

    device = str(resolve_device(args.device))
    cases = sorted(p.name[: -len(".nii.gz")] for p in (DATA / "images").glob("*.nii.gz"))
    labelled = cases[: args.labelled]
    unlabelled = cases[args.labelled: args.labelled + args.unlabelled]
    heldout = cases[args.labelled + args.unlabelled: args.labelled + args.unlabelled + args.heldout]
    report = {"machine": "see README", "device": device, "labelled": labelled, "unlabelled": unlabelled,
              "heldout": heldout, "schedule": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-ssl-") as tmp, open(Path(tmp) / "nnunet.log", "w") as log, \
            contextlib.redirect_stdout(log):
        work = Path(tmp)
        report["labelled_only_dice"], report["labelled_only_seconds"] = labelled_only(labelled, args, device, heldout, work)
        for name, warm in (("scratch", False), ("warm", True)):
            ws = work / f"ws_{name}"
            build_workspace(ws, labelled, unlabelled, work)
            options = RefineOptions(rounds=args.rounds, configuration=args.configuration, epochs=args.epochs,
                                    iterations=args.iterations, val_iterations=5, warm_start=warm,
                                    warm_epochs=args.warm_epochs, device=device, convergence=1.0)
            RefineJob(Workspace.open(ws), options).run()
            nnunet.use_folders(ws / "refine" / "nnunet")
            report[name] = {
                "heldout_dice": [heldout_dice(r, args.configuration, "all", device, heldout, work / name) for r in range(args.rounds)],
                "pseudo_dice_vs_truth": [json.loads((ws / "refine" / "rounds" / f"round_{r:02d}" / "round.json").read_text())["heldout_dice"]
                                         for r in range(args.rounds)],
                "round_seconds": round_seconds(ws / "refine" / "events.jsonl")}
    print(json.dumps(report, indent=2))
    print(f"labelled only ({args.labelled} cases): held-out Dice {report['labelled_only_dice']:.3f}")
    for name in ("scratch", "warm"):
        r = report[name]
        print(f"{name:>7}: held-out Dice per round {[round(d, 3) for d in r['heldout_dice']]}, pseudo-label Dice vs truth "
              f"{[round(d, 3) for d in r['pseudo_dice_vs_truth']]}, round times {[round(s) for s in r['round_seconds']]} s")


if __name__ == "__main__":
    main()
