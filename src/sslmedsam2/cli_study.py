"""The study commands: `workspace init|add|status|review`, `refine`, `predict`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from sslmedsam2.cli import _say
from sslmedsam2.errors import UserError


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
        _say(f"workspace {ws.root} created (axis {ws.axis}, labels {ws.labels or 'from the first case added'})")
    elif args.action == "add":
        ws = Workspace.open(args.workspace)
        case = add_case(ws, args.image, args.label, args.pseudo, args.eval_label, args.id, args.review_from)
        _say(f"added case {case.id} (ground truth: {case.has_label}, pseudo-label: {case.has_pseudo}, "
             f"held-out label: {case.has_eval})")
    elif args.action == "status":
        print_status(Workspace.open(args.workspace), args.json)
    elif args.action == "review":
        from sslmedsam2.study.review import SliceState

        ws = Workspace.open(args.workspace)
        if args.case not in ws.cases or not ws.cases[args.case].has_pseudo:
            raise UserError(f"case {args.case}: not in the workspace or without a pseudo-label")
        states = ws.review(args.case)
        try:
            chosen = [int(v) for v in args.slices.split(",")]
        except ValueError:
            raise UserError("--slices: a comma-separated list of slice numbers") from None
        bad = [z for z in chosen if not 0 <= z < len(states)]
        if bad:
            raise UserError(f"slices {bad} are outside 0..{len(states) - 1}")
        for z in chosen:
            states[z] = SliceState(args.state)
        ws.set_review(args.case, states)
        _say(f"case {args.case}: slices {chosen} are {args.state}")
    return 0


def print_status(ws, as_json: bool) -> None:
    from collections import Counter

    from sslmedsam2.refine.rounds import refine_status

    cases = []
    for case in sorted(ws.cases.values(), key=lambda c: c.id):
        counts = Counter(s.value for s in ws.review(case.id))
        cases.append({"id": case.id, "ground_truth": case.has_label, "pseudo": case.has_pseudo,
                      "heldout": case.has_eval, "review": dict(sorted(counts.items()))})
    job = refine_status(ws)
    summary = {"workspace": str(ws.root), "axis": ws.axis, "labels": ws.labels, "cases": cases,
               "refine": {"state": job.get("state", "not started"), "round": job.get("round"), "stage": job.get("stage"),
                          "rounds": job.get("rounds", []), "message": job.get("message", "")}}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"workspace {ws.root}: {len(cases)} cases, labels {ws.labels}, axis {ws.axis}")
    for c in cases:
        review = ", ".join(f"{k} {v}" for k, v in c["review"].items()) or "-"
        print(f"  {c['id']:<24} {'GT' if c['ground_truth'] else '  '} {'pseudo' if c['pseudo'] else '      '} "
              f"{'held-out' if c['heldout'] else ''}  review: {review}")
    r = summary["refine"]
    print(f"refine: {r['state']}" + (f", round {r['round']}" if r["round"] is not None else "")
          + (f" ({r['message']})" if r["message"] else ""))


def _refine_options(args: argparse.Namespace):
    from sslmedsam2.refine.rounds import RefineOptions

    chosen = {k: v for k, v in {"rounds": args.rounds, "configuration": args.configuration, "epochs": args.epochs,
                                "iterations": args.iterations, "warm_start": args.warm_start or None,
                                "warm_epochs": args.warm_epochs, "fold": args.fold, "device": args.device,
                                "convergence": args.convergence, "ignore": args.ignore}.items() if v is not None}
    return RefineOptions.quick(**chosen) if args.quick else RefineOptions(**chosen)


def cmd_refine(args: argparse.Namespace) -> int:
    from sslmedsam2.refine.rounds import RefineJob, refine_status
    from sslmedsam2.study.workspace import Workspace

    ws = Workspace.open(args.workspace)
    status = refine_status(ws)
    if args.cancel:
        if status.get("state") != "running":
            raise UserError(f"no refine job is running on {ws.root}")
        os.kill(int(status["pid"]), signal.SIGTERM)
        _say(f"asked the refine job (pid {status['pid']}) to stop at its next safe point")
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
    _say(f"refine {state}; progress plot: {ws.refine_dir / 'progress.png'}")
    return 0 if state in ("finished", "converged") else 3


def follow(ws, status: dict) -> int:
    from sslmedsam2.refine.events import process_alive

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
            if current.get("state") != "running" or not process_alive(current.get("pid")):
                bar.monitor.poll()
                if not bar.monitor.finished:
                    bar.bar.write("the job is not running (crashed or killed?); run refine again to resume")
                    return 1
            time.sleep(0.5)
    finally:
        bar.close()
    _say(f"refine {bar.monitor.state}")
    return 0 if bar.monitor.state in ("finished", "converged") else 3


def cmd_predict(args: argparse.Namespace) -> int:
    import tempfile

    from sslmedsam2.atomic import check_writable
    from sslmedsam2.models.loader import resolve_device
    from sslmedsam2.refine import nnunet
    from sslmedsam2.refine.rounds import refine_status
    from sslmedsam2.study.workspace import Workspace
    from sslmedsam2.volume import read_image, read_label_map, write_image

    ws = Workspace.open(args.workspace)
    check_writable(args.output)
    status = refine_status(ws)
    options = status.get("options") or {}
    nnunet.use_folders(ws.refine_dir / "nnunet")
    done = sorted(r["round"] for r in status.get("rounds", []))
    usable = [r for r in done if (nnunet.model_folder(r, options["configuration"]) / f"fold_{options['fold']}"
                                  / "checkpoint_final.pth").is_file()] if options else []
    if not usable:
        raise UserError(f"{ws.root}: no finished refinement round yet; run `sslmedsam2 refine {ws.root}` first")
    image = read_image(args.image)
    with tempfile.TemporaryDirectory(prefix="sslmedsam2-predict-") as tmp, \
            open(ws.refine_dir / "nnunet.log", "a") as log, contextlib.redirect_stdout(log):
        source, result = Path(tmp) / "case_0000.nii.gz", Path(tmp) / "case.nii.gz"
        write_image(image, source)
        nnunet.predict(usable[-1], options["configuration"], options["fold"], str(resolve_device(args.device)),
                       [source], [result])
        labels = read_label_map(result)
        labels.CopyInformation(image)
        write_image(labels, args.output)
    _say(f"segmented {args.image} with the round {usable[-1]} model -> {args.output}")
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
    i.add_argument("--channel", default="MRI", help="image modality name for nnU-Net (MRI, CT: CT changes nnU-Net's normalisation)")
    a = wsub.add_parser("add", help="add a case (copied into the workspace)")
    a.add_argument("workspace", type=Path)
    a.add_argument("--image", type=Path, required=True)
    a.add_argument("--label", type=Path, help="ground truth (trained on, never overwritten)")
    a.add_argument("--pseudo", type=Path, help="pseudo-label (SAM2, few-shot, or any file)")
    a.add_argument("--eval-label", type=Path, help="held-out ground truth: only used to score rounds")
    a.add_argument("--review-from", type=Path, help="a .confidence.csv whose seed slices become 'seed' in the review")
    a.add_argument("--id", help="case id (default: the image file name without suffix)")
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
    f.add_argument("--fold", help="nnU-Net fold: all (default, trains on every case) or 0-4")
    f.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"))
    f.add_argument("--ignore", choices=("none", "rejected", "unreviewed"), help="pseudo-label slices exported as "
                   "nnU-Net's ignore label: rejected (default), unreviewed (unreviewed and rejected) or none")
    f.add_argument("--quick", action="store_true", help="tiny schedule for a CPU smoke run (2 epochs x 3 iterations)")
    f.add_argument("--follow", action="store_true", help="show the progress of the job running on WS, until it ends")
    f.add_argument("--cancel", action="store_true", help="ask the job running on WS to stop at its next safe point")
    f.set_defaults(func=cmd_refine)

    p = sub.add_parser("predict", help="segment an image with the workspace's latest refined nnU-Net")
    p.add_argument("workspace", type=Path)
    p.add_argument("image", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"))
    p.set_defaults(func=cmd_predict)
