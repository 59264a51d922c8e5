"""The study commands: `refine`, `predict`, `keyslices` (`workspace`: sslmedsam2.cli.workspace)."""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
import time
from pathlib import Path

from sslmedsam2.cli.options import add_overwrite_option, add_shard_option, add_uneven_option, say
from sslmedsam2.errors import UserError


class _JobBar:
    """Draws a refine job's progress from its events, whether it runs here or in another process: a bar with where
    the job is, rounds done and the time left, and a line per stage, round and ending, in the order they happened.
    A thread redraws it every second, so its clock runs between events."""

    def __init__(self, refine_dir: Path, rounds: int) -> None:
        from tqdm import tqdm

        from sslmedsam2.refine.monitor import JobMonitor

        tqdm.monitor_interval = 0  # no tqdm monitor thread: the redraws come from this object's own thread
        self.monitor = JobMonitor(refine_dir)
        self.rounds = rounds
        self.bar = tqdm(total=1000, desc="refine: starting", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="refine-bar", daemon=True)
        self.ticker.start()

    def _tick(self) -> None:
        while not self.done.wait(1.0):
            with self.lock:
                self._redraw()

    def _redraw(self) -> None:
        self.bar.n = int(1000 * self.monitor.fraction(self.rounds))
        self.bar.set_description_str(f"refine: {self.monitor.summary(self.rounds)}", refresh=False)
        self.bar.refresh()

    def show(self, event: dict) -> None:
        with self.lock:
            self.monitor.update(event)
            line = _event_line(event)
            if line:
                self.bar.write(line, file=sys.stderr)
            self._redraw()

    def close(self) -> None:
        self.done.set()
        self.ticker.join()
        self.bar.close()


def _event_line(event: dict) -> str | None:
    """What a person reads of an event: stages, rounds, errors and the job's start and end (epochs and cases are
    the bar's); with its local time."""
    from datetime import datetime

    try:
        stamp = datetime.fromisoformat(event["time"]).astimezone().strftime("%H:%M:%S")
    except (KeyError, TypeError, ValueError):
        stamp = "--:--:--"
    kind, r = event["event"], event.get("round")
    if kind == "job":
        message = f": {event['message']}" if event.get("message") else ""
        return f"{stamp} refine {event['state']}{message}"
    if kind == "stage":
        return f"{stamp} round {r}: {event.get('message') or event.get('stage')}"
    if kind == "round":
        change, held = event.get("mean_dice_change"), event.get("heldout_dice")
        text = (f"{stamp} round {r} done: Dice vs previous pseudo-labels {'n/a' if change is None else f'{change:.4f}'}"
                + (f", held-out Dice {held:.4f}" if held is not None else "") + (" (converged)" if event.get("converged") else ""))
        labels = event.get("label_change") or {}
        if labels:
            text += " [" + ", ".join(f"{name} {d:.3f}" for name, d in labels.items()) + "]"
        if event.get("sources"):  # --sam2-from-nnunet
            won = event["sources"]
            text += (f"\n{stamp} round {r}: slices from SAM2 {won['sam2']}, nnU-Net {won['nnunet']}, kept as vouched "
                     f"for {won['human']}")
        return text
    if kind == "error":
        return f"{stamp} error: {event.get('message')}"
    return None


def _refine_options(args: argparse.Namespace):
    from sslmedsam2.refine.rounds import RefineOptions

    chosen = {k: v for k, v in {"rounds": args.rounds, "configuration": args.configuration, "epochs": args.epochs,
                                "iterations": args.iterations, "warm_start": args.warm_start or None,
                                "warm_epochs": args.warm_epochs, "fold": args.fold, "device": args.device,
                                "convergence": args.convergence, "ignore": args.ignore,
                                "gpus": args.gpus}.items() if v is not None}
    sam2 = {k: v for k, v in {"sam2_model": args.model, "sam2_checkpoint": str(args.checkpoint) if args.checkpoint else None,
                              "sam2_image_size": args.image_size, "sam2_download": False if args.no_download else None,
                              "key_slices": args.key_slices, "min_continuity": args.min_continuity,
                              "fusion": args.fusion}.items() if v is not None}
    if sam2 and not args.sam2_from_nnunet:
        raise UserError("--model, --checkpoint, --image-size, --no-download, --key-slices, --min-continuity and "
                        "--fusion set up SAM2 for --sam2-from-nnunet; add it or leave them out")
    chosen.update(sam2, **({"sam2_from_nnunet": True} if args.sam2_from_nnunet else {}))
    options = RefineOptions.quick(**chosen) if args.quick else RefineOptions(**chosen)
    options.gpu_count()  # --gpus on a machine without them: refused before anything is drawn or started
    return options


def cmd_refine(args: argparse.Namespace) -> int:
    from sslmedsam2.refine.rounds import RefineJob, current_outputs, refine_status
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
    if state == "cancelled":
        say(f"refine cancelled ({refine_status(ws).get('message', '')}); to resume: {_resume_command(args)}")
        return 3
    outputs = current_outputs(ws)
    say(f"refine {state}; pseudo-labels now in {outputs['pseudo_labels']}, progress plot {ws.refine_dir / 'progress.png'}"
        + (f", pictures per case in {outputs['overviews']}" if outputs["overviews"] else ""))
    return 0


_REFINE_OPTIONS = (("rounds", "--rounds"), ("convergence", "--convergence"), ("configuration", "--configuration"),
                   ("epochs", "--epochs"), ("iterations", "--iterations"), ("warm_start", "--warm-start"),
                   ("warm_epochs", "--warm-epochs"), ("fold", "--fold"), ("device", "--device"),
                   ("ignore", "--ignore"), ("gpus", "--gpus"), ("quick", "--quick"), ("sam2_from_nnunet", "--sam2-from-nnunet"),
                   ("model", "--model"), ("checkpoint", "--checkpoint"), ("image_size", "--image-size"),
                   ("no_download", "--no-download"), ("key_slices", "--key-slices"),
                   ("min_continuity", "--min-continuity"), ("fusion", "--fusion"))


def _resume_command(args: argparse.Namespace) -> str:
    """The command that resumes this job: the same options."""
    words = ["sslmedsam2", "refine", str(args.workspace)]
    for dest, flag in _REFINE_OPTIONS:
        value = getattr(args, dest, None)
        if value is True:
            words.append(flag)
        elif value not in (None, False):
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def follow(ws, status: dict) -> int:
    """`refine --follow`: the running job's events from the start of its run, in order, until it ends."""
    from sslmedsam2.refine.events import job_running, read_events

    rounds = (status.get("options") or {}).get("rounds", 1)
    bar = _JobBar(ws.refine_dir, rounds)
    bar.monitor.attach_to_latest_run()

    def drain() -> None:
        events, bar.monitor.offset = read_events(bar.monitor.log.path, bar.monitor.offset)
        for event in events:
            bar.show(event)

    try:
        while True:
            drain()
            if bar.monitor.finished:
                break
            if not job_running(ws.refine_dir):
                drain()  # what the job wrote before it ended
                if not bar.monitor.finished:
                    bar.bar.write("the job is not running (crashed or killed?); run refine again to resume",
                                  file=sys.stderr)
                    return 1
                break
            time.sleep(0.5)
    finally:
        bar.close()
    say(f"refine {bar.monitor.state}")
    return 0 if bar.monitor.state in ("finished", "converged") else 3


def cmd_predict(args: argparse.Namespace) -> int:
    from sslmedsam2.labelmap.confidence import confidence_path
    from sslmedsam2.refine.predict import predict_image, single_picture
    from sslmedsam2.study.workspace import Workspace

    if (args.image is None) == (args.input is None):
        raise UserError("predict: give one IMAGE, or --input DIR|LIST for many (not both)")
    if args.input is not None:
        return _predict_cohort(args)
    if args.shard or args.redo:
        raise UserError("--shard and --redo go with --input")
    model = predict_image(Workspace.open(args.workspace), args.image, args.output, args.device, progress=True,
                          overwrite=args.overwrite, allow_uneven=args.allow_uneven_slices)
    say(f"segmented {args.image} with the round {model.round} model -> {args.output} "
        f"(confidence: {confidence_path(args.output).name}, picture: {single_picture(args.output).name})")
    return 0


def _predict_cohort(args: argparse.Namespace) -> int:
    from sslmedsam2.cli.cohort import Interrupted, run_shard
    from sslmedsam2.cohort.shards import parse_shard
    from sslmedsam2.refine.predict import PredictCohortOptions, predict_cohort
    from sslmedsam2.study.workspace import Workspace

    ws = Workspace.open(args.workspace)
    options = PredictCohortOptions(args.input, args.output, args.device,
                                   parse_shard(args.shard) if args.shard else None, args.redo, args.overwrite,
                                   args.allow_uneven_slices)
    # the case under way draws nnU-Net's own sliding-window bar under the cases bar
    written = run_shard(lambda bars: predict_cohort(ws, options, log=bars.log, cases_bar=bars.cases, progress=True),
                        "predict", unit=None)
    if isinstance(written, Interrupted):
        return written.code
    say(f"{len(written)} cases predicted into {args.output} (`sslmedsam2 cohort status {args.output}`)")
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
    from sslmedsam2.cli.workspace import add_workspace_command

    add_workspace_command(sub)

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
    f.add_argument("--gpus", metavar="N|all", help="train each round with nnU-Net's multi-GPU training on N GPUs of "
                   "this node (all: every GPU this process sees) and spread the round's predictions over them, one "
                   "process per GPU; refused on a machine without CUDA GPUs (docs/cluster.md)")
    f.add_argument("--quick", action="store_true", help="tiny schedule for a CPU smoke run (2 epochs x 3 iterations; "
                   "prediction without test-time mirroring)")
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

    p = sub.add_parser("predict", help="segment images with the workspace's latest refined nnU-Net",
                       description="One IMAGE -> OUTPUT (and OUTPUT's name + .confidence.csv and .overview.png, a "
                       "picture), or every image of --input into OUTDIR: per case the label map (the input's file "
                       "name), its .confidence.csv, .case.json and overview/<name>.png, OUTDIR/cohort.json and a status file per shard (`sslmedsam2 cohort status "
                       "OUTDIR`). The model is loaded once; a rerun resumes (finished cases are skipped).")
    p.add_argument("workspace", type=Path)
    p.add_argument("image", type=Path, nargs="?", help="one image (or use --input)")
    p.add_argument("--input", type=Path, metavar="DIR|LIST", help="a folder of images, or a text file listing them "
                   "(one path a line, relative to the file's folder; # comments): predict them all into OUTDIR")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT|OUTDIR")
    add_shard_option(p, "case", "with --input: ")
    p.add_argument("--redo", action="store_true", help="with --input: predict again the finished cases in OUTDIR "
                   "that an earlier model predicted (without it such a folder is refused)")
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
