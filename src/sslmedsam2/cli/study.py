"""The study commands: `workspace init|add|status|review`, `refine`, `predict`, `keyslices`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sslmedsam2.cli.options import add_overwrite_option, add_uneven_option, say
from sslmedsam2.errors import UserError

if TYPE_CHECKING:
    from sslmedsam2.study.workspace import Workspace


class _JobBar:
    """Draws a refine job's progress from its events, whether it runs here or in another process."""

    def __init__(self, refine_dir: Path, rounds: int) -> None:
        from tqdm import tqdm

        from sslmedsam2.refine.monitor import JobMonitor

        tqdm.monitor_interval = 0  # no monitor thread in a process that nnU-Net may fork

        self.monitor = JobMonitor(refine_dir)
        self.rounds = rounds
        self.bar = tqdm(total=1000, desc="refine: starting", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")

    def show(self, event: dict) -> None:
        self.monitor.update(event)
        if event["event"] == "round":
            change = event.get("mean_dice_change")
            held = event.get("heldout_dice")
            self.bar.write(f"round {event['round']}: Dice vs previous pseudo-labels "
                           f"{'n/a' if change is None else f'{change:.4f}'}"
                           + (f", held-out Dice {held:.4f}" if held is not None else "")
                           + (" (converged)" if event.get("converged") else ""))
            if event.get("sources"):  # --sam2-from-nnunet
                won = event["sources"]
                self.bar.write(f"round {event['round']}: slices from SAM2 {won['sam2']}, nnU-Net {won['nnunet']}, "
                               f"kept as vouched for {won['human']}")
        elif event["event"] == "error":
            self.bar.write(f"error: {event.get('message')}")
        self.bar.n = int(1000 * self.monitor.fraction(self.rounds))
        self.bar.set_description_str(f"refine: {self.monitor.describe()}")

    def close(self) -> None:
        self.bar.close()


def cmd_workspace(args: argparse.Namespace) -> int:
    from sslmedsam2.study.workspace import Workspace, add_case, init_workspace, parse_labels

    if args.action == "init":
        ws = init_workspace(args.workspace, parse_labels(args.label) if args.label else None, args.axis, args.channel)
        say(f"workspace {ws.root} created (axis {ws.axis}, labels {ws.labels or 'from the first case added'})")
    elif args.action == "add":
        ws = Workspace.open(args.workspace)
        case = add_case(ws, args.image, args.label, args.pseudo, args.eval_label, args.id, args.review_from,
                        allow_uneven=args.allow_uneven_slices)
        say(f"added case {case.id} (ground truth: {case.has_label}, pseudo-label: {case.has_pseudo}, "
             f"held-out label: {case.has_eval})")
    elif args.action == "status":
        print_status(Workspace.open(args.workspace, allow_missing=True), args.json)
    elif args.action == "review":
        review_slices(Workspace.open(args.workspace, allow_missing=True), args.case, args.slices, args.state)
    return 0


def review_slices(ws: Workspace, case_id: str, slices: str, state: str) -> None:
    """`workspace review`: set the state of the given slices ("3,4,5") of a case's pseudo-label."""
    from sslmedsam2.study.index import count_slices
    from sslmedsam2.study.review import SliceState

    if case_id not in ws.cases or not ws.cases[case_id].has_pseudo:
        raise UserError(f"case {case_id!r}: not in the workspace or without a pseudo-label")
    ws.check_complete([case_id])
    try:
        chosen = [int(v) for v in slices.split(",")]
    except ValueError:
        raise UserError("--slices: a comma-separated list of slice numbers") from None
    with ws.locked() as current:
        states = current.review(case_id)
        if not states:  # a pseudo-label without a review file: nobody reviewed it yet
            states = [SliceState.UNREVIEWED] * count_slices(ws.file(case_id, "image"), ws.axis)
        bad = [z for z in chosen if not 0 <= z < len(states)]
        if bad:
            raise UserError(f"slices {bad} are outside 0..{len(states) - 1}")
        for z in chosen:
            states[z] = SliceState(state)
        current.set_review(case_id, states)
    say(f"case {case_id}: slices {chosen} are {state}")


def print_status(ws: Workspace, as_json: bool) -> None:
    """`workspace status`: cases (review counts, missing files) and the refine job, as text or JSON."""
    from collections import Counter

    from sslmedsam2.refine.rounds import refine_status

    cases = []
    for case in sorted(ws.cases.values(), key=lambda c: c.id):
        counts = Counter(s.value for s in ws.review(case.id))
        cases.append({"id": case.id, "ground_truth": case.has_label, "pseudo": case.has_pseudo,
                      "heldout": case.has_eval, "review": dict(sorted(counts.items())),
                      "files_missing": list(case.missing)})
    job = refine_status(ws)
    summary = {"workspace": str(ws.root), "axis": ws.axis, "labels": ws.labels, "cases": cases,
               "refine": {"state": job.get("state", "not started"), "round": job.get("round"), "stage": job.get("stage"),
                          "rounds": job.get("rounds", []), "message": job.get("message", "")}}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"workspace {ws.root}: {len(cases)} cases, labels {ws.labels}, axis {ws.axis}")
    for c in cases:
        review = "review: " + (", ".join(f"{k} {v}" for k, v in c["review"].items()) or "-")
        if c["files_missing"]:
            review = f"files missing: {', '.join(c['files_missing'])}"
        print(f"  {c['id']:<24} {'GT' if c['ground_truth'] else '  '} {'pseudo' if c['pseudo'] else '      '} "
              f"{'held-out' if c['heldout'] else '        '}  {review}")
    r = summary["refine"]
    print(f"refine: {r['state']}" + (f", round {r['round']}" if r["round"] is not None else "")
          + (f" ({r['message']})" if r["message"] else ""))


def _refine_options(args: argparse.Namespace):
    from sslmedsam2.refine.rounds import RefineOptions

    chosen = {k: v for k, v in {"rounds": args.rounds, "configuration": args.configuration, "epochs": args.epochs,
                                "iterations": args.iterations, "warm_start": args.warm_start or None,
                                "warm_epochs": args.warm_epochs, "fold": args.fold, "device": args.device,
                                "convergence": args.convergence, "ignore": args.ignore}.items() if v is not None}
    sam2 = {k: v for k, v in {"sam2_model": args.model, "sam2_checkpoint": str(args.checkpoint) if args.checkpoint else None,
                              "sam2_image_size": args.image_size, "sam2_download": False if args.no_download else None,
                              "key_slices": args.key_slices, "min_continuity": args.min_continuity,
                              "fusion": args.fusion}.items() if v is not None}
    if sam2 and not args.sam2_from_nnunet:
        raise UserError("--model, --checkpoint, --image-size, --no-download, --key-slices, --min-continuity and "
                        "--fusion set up SAM2 for --sam2-from-nnunet; add it or leave them out")
    chosen.update(sam2, **({"sam2_from_nnunet": True} if args.sam2_from_nnunet else {}))
    return RefineOptions.quick(**chosen) if args.quick else RefineOptions(**chosen)


def cmd_refine(args: argparse.Namespace) -> int:
    from sslmedsam2.refine.rounds import RefineJob, refine_status
    from sslmedsam2.study.workspace import Workspace

    ws = Workspace.open(args.workspace)
    status = refine_status(ws)
    if args.cancel:
        from sslmedsam2.refine.events import request_stop

        if status.get("state") != "running":  # refine_status: "running" only while a job holds the lock
            raise UserError(f"no refine job is running on {ws.root}")
        request_stop(ws.refine_dir)  # a file, not a signal: the same gentle stop on Windows
        say(f"asked the refine job (pid {status['pid']}) to stop at its next safe point")
        return 0
    if args.follow:
        return follow(ws, status)
    options = _refine_options(args)
    bar = _JobBar(ws.refine_dir, options.rounds)
    bar.monitor.offset = bar.monitor.log.path.stat().st_size if bar.monitor.log.path.exists() else 0
    try:
        state = RefineJob(ws, options, on_event=bar.show).run()
    finally:
        bar.close()
    say(f"refine {state}; progress plot: {ws.refine_dir / 'progress.png'}")
    return 0 if state in ("finished", "converged") else 3


def follow(ws, status: dict) -> int:
    from sslmedsam2.refine.events import job_running

    rounds = (status.get("options") or {}).get("rounds", 1)
    bar = _JobBar(ws.refine_dir, rounds)
    bar.monitor.attach_to_latest_run()
    try:
        while True:
            for event in bar.monitor.poll():
                bar.show(event)
            if bar.monitor.finished:
                break
            current = bar.monitor.log.read_status()
            if current.get("state") != "running" or not job_running(ws.refine_dir):
                bar.monitor.poll()
                if not bar.monitor.finished:
                    bar.bar.write("the job is not running (crashed or killed?); run refine again to resume")
                    return 1
            time.sleep(0.5)
    finally:
        bar.close()
    say(f"refine {bar.monitor.state}")
    return 0 if bar.monitor.state in ("finished", "converged") else 3


def cmd_predict(args: argparse.Namespace) -> int:
    from sslmedsam2.refine.predict import predict_image
    from sslmedsam2.study.workspace import Workspace

    from sslmedsam2.labelmap.confidence import confidence_path

    model = predict_image(Workspace.open(args.workspace), args.image, args.output, args.device, progress=True,
                          overwrite=args.overwrite, allow_uneven=args.allow_uneven_slices)
    say(f"segmented {args.image} with the round {model.round} model -> {args.output} "
         f"(confidence: {confidence_path(args.output).name})")
    return 0


def cmd_keyslices(args: argparse.Namespace) -> int:
    from sslmedsam2.refine.keyslices import run_keyslices

    keys = run_keyslices(args.prediction, args.output, args.prob or [], args.per_label, args.min_continuity,
                         args.axis, log=say, overwrite=args.overwrite)
    for label in sorted({k.label for k in keys}):
        chosen = [k for k in keys if k.label == label]
        say(f"label {label}: slices " + ", ".join(
            f"{k.slice} (continuity {k.continuity:.2f}" + (f", certainty {k.certainty:.2f})" if k.certainty == k.certainty else ")")
            for k in chosen))
    say(f"{len(keys)} key slices -> {args.output}")
    return 0


def add_study_commands(sub) -> None:
    w = sub.add_parser("workspace", help="create and fill a study workspace", description="A study workspace holds "
                       "images, ground truth, pseudo-labels with per-slice review state, and refinement rounds.")
    wsub = w.add_subparsers(dest="action", required=True, metavar="ACTION")
    i = wsub.add_parser("init", help="create an empty workspace")
    i.add_argument("workspace", type=Path)
    i.add_argument("--label", action="append", metavar="NAME=VALUE", help="a structure and its label value (repeat); "
                   "default: taken from the first case added")
    i.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"), help="slice axis of review states")
    i.add_argument("--channel", default="MRI", type=str.upper, choices=("MRI", "CT"),
                   help="image modality for nnU-Net (MRI or CT: CT changes nnU-Net's normalisation)")
    a = wsub.add_parser("add", help="add a case (copied into the workspace)")
    a.add_argument("workspace", type=Path)
    a.add_argument("--image", type=Path, required=True)
    a.add_argument("--label", type=Path, help="ground truth (trained on, never overwritten)")
    a.add_argument("--pseudo", type=Path, help="pseudo-label (SAM2, few-shot, or any file)")
    a.add_argument("--eval-label", type=Path, help="held-out ground truth: only used to score rounds")
    a.add_argument("--review-from", type=Path, help="a .confidence.csv whose seed slices become 'seed' in the review")
    a.add_argument("--id", help="case id (default: the image file name without suffix)")
    add_uneven_option(a)
    s = wsub.add_parser("status", help="cases, review counts and the refine job's state")
    s.add_argument("workspace", type=Path)
    s.add_argument("--json", action="store_true")
    r = wsub.add_parser("review", help="set the review state of slices of a case's pseudo-label")
    r.add_argument("workspace", type=Path)
    r.add_argument("case")
    r.add_argument("--slices", required=True, help="comma-separated slice numbers along the workspace axis")
    r.add_argument("--state", required=True, choices=("seed", "accepted", "rejected", "edited", "unreviewed"))
    w.set_defaults(func=cmd_workspace)

    f = sub.add_parser("refine", help="iterative nnU-Net refinement of the pseudo-labels (resumable)",
                       description="Train nnU-Net v2 on ground truth + pseudo-labels, predict the cases without ground "
                       "truth, replace their pseudo-labels (slices a person vouched for are kept), repeat until the "
                       "pseudo-labels stop changing. Rerun the same command to resume after a crash. Events: "
                       "WS/refine/events.jsonl; status: WS/refine/status.json; plot: WS/refine/progress.png.")
    f.add_argument("workspace", type=Path)
    f.add_argument("--rounds", type=int, help="at most this many rounds (default 5)")
    f.add_argument("--convergence", type=float, help="stop when the mean Dice between rounds reaches this (default 0.99)")
    f.add_argument("--configuration", choices=("2d", "3d_fullres", "3d_lowres"), help="nnU-Net configuration (default 3d_fullres)")
    f.add_argument("--epochs", type=int, help="epochs per round (default 250)")
    f.add_argument("--iterations", type=int, help="iterations per epoch (default 250)")
    f.add_argument("--warm-start", action="store_true", help="start each round from the previous round's weights")
    f.add_argument("--warm-epochs", type=int, help="epochs of a warm-started round (default 50)")
    f.add_argument("--fold", help="nnU-Net fold: all (default, trains on every case) or 0-4 (nnU-Net's 5-fold "
                   "split: needs at least 5 training cases)")
    f.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"))
    f.add_argument("--ignore", choices=("none", "rejected", "unreviewed"), help="pseudo-label slices exported as "
                   "nnU-Net's ignore label: rejected (default), unreviewed (unreviewed and rejected) or none")
    f.add_argument("--quick", action="store_true", help="tiny schedule for a CPU smoke run (2 epochs x 3 iterations)")
    f.add_argument("--follow", action="store_true", help="show the progress of the job running on WS, until it ends")
    f.add_argument("--cancel", action="store_true", help="ask the job running on WS to stop at its next safe point "
                   "(writes WS/refine/stop, which the job watches)")
    g = f.add_argument_group("SAM2 from nnU-Net (IFDL)", "after each round's training, nnU-Net's prediction of each "
                             "case without ground truth gives key slices (as `keyslices`), SAM2 propagates them (and the "
                             "case's vouched-for slices), and SAM2's result becomes the next pseudo-label")
    g.add_argument("--sam2-from-nnunet", action="store_true", help="turn it on (default off)")
    g.add_argument("--model", metavar="NAME", help="SAM2 weights by name (default: propagate's; see `sslmedsam2 models`)")
    g.add_argument("--checkpoint", type=Path, metavar="PATH", help="a local SAM2 checkpoint file instead of the cached download")
    g.add_argument("--image-size", type=int, metavar="N", help="SAM2 input size (multiple of 16; default: the model's own)")
    g.add_argument("--no-download", action="store_true", help="never download SAM2 weights")
    g.add_argument("--key-slices", type=int, metavar="K", help="key slices per label (default 3)")
    g.add_argument("--min-continuity", type=float, metavar="C", help="a key slice's Dice with the label's 3D component on both "
                   "neighbouring slices must reach this (default 0.6)")
    g.add_argument("--fusion", choices=("sam2", "confidence"), help="sam2 (default): SAM2's result is the pseudo-label; "
                   "confidence: per slice, the more confident of SAM2 and nnU-Net (mean confidence over the prompted labels)")
    f.set_defaults(func=cmd_refine)

    p = sub.add_parser("predict", help="segment an image with the workspace's latest refined nnU-Net")
    p.add_argument("workspace", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    add_overwrite_option(p)
    add_uneven_option(p)
    p.set_defaults(func=cmd_predict)

    k = sub.add_parser("keyslices", help="the slices of a prediction most worth prompting SAM2 with, as a seed map",
                       description="Per label, split the extent of its largest 3D component into K equal parts and keep "
                       "in each the slice where the prediction is most certain (from --prob; without it, the most "
                       "continuous) among those whose mask continues into both neighbouring slices of the component "
                       "(Dice >= --min-continuity). Writes SEEDS: those slices' masks, on PRED's grid; give it to "
                       "`propagate` as its seeds.")
    k.add_argument("prediction", type=Path, metavar="PRED", help="a label map, e.g. from `predict` or nnU-Net")
    k.add_argument("-o", "--output", type=Path, required=True, metavar="SEEDS", help="the seed map to write")
    k.add_argument("--prob", action="append", metavar="PROB", help="per-slice certainty: PRED's .confidence.csv (from "
                   "`predict`, `propagate`, `pseudolabel`), or a probability map per label (LABEL=FILE, or pseudolabel's "
                   "NAME.prob_<label>.nii.gz); repeat")
    k.add_argument("--per-label", type=int, metavar="K", help="key slices per label (default 3)")
    k.add_argument("--min-continuity", type=float, metavar="C", help="Dice of a key slice's mask with the component "
                   "on each neighbouring slice, at least (default 0.6)")
    k.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"), help="slice axis (default axial)")
    add_overwrite_option(k)
    k.set_defaults(func=cmd_keyslices)
