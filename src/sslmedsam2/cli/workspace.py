"""`sslmedsam2 workspace init|add|import|update|show|status|review`: creating, filling, reviewing and reading a
study workspace."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sslmedsam2.cli.options import add_overwrite_option, add_uneven_option, say
from sslmedsam2.errors import UserError

if TYPE_CHECKING:
    from sslmedsam2.study.workspace import Workspace


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
    elif args.action == "import":
        return import_folder(Workspace.open(args.workspace), args)
    elif args.action == "update":
        update_pseudo(Workspace.open(args.workspace), args.case, args.pseudo, args.review_from)
    elif args.action == "show":
        show(Workspace.open(args.workspace, allow_missing=True), args)
    elif args.action == "status":
        print_status(Workspace.open(args.workspace, allow_missing=True), args.json)
    elif args.action == "review":
        review_slices(Workspace.open(args.workspace, allow_missing=True), args.case, args.slices, args.state)
    return 0


def import_folder(ws: Workspace, args: argparse.Namespace) -> int:
    """`workspace import`: a line per case as it goes, then what was added and skipped."""
    from sslmedsam2.study.dataset import import_dataset

    cases = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    report = import_dataset(ws, args.folder, args.labels_as, args.labels, cases, args.allow_uneven_slices,
                            on_case=lambda name, outcome, detail: say(f"{outcome} {name}: {detail}"), on_note=say)
    say(f"import of {args.folder} ({report.layout}): {len(report.added)} added, {len(report.skipped)} skipped; "
        f"the workspace has {len(ws.cases)} cases")
    return 0


def refuse_while_refining(ws: Workspace) -> None:
    """Pseudo-labels are not replaced under a running refine job, which reads them."""
    from sslmedsam2.refine.events import job_running

    if job_running(ws.refine_dir):
        raise UserError(f"a refine job is running on {ws.root}; stop it first (`sslmedsam2 refine {ws.root} --cancel`)")


def update_pseudo(ws: Workspace, case_id: str, pseudo: Path, review_from: Path | None) -> None:
    """`workspace update`: replace a case's pseudo-label; refused while a refine job runs on the workspace."""
    from sslmedsam2.study.workspace import update_case

    refuse_while_refining(ws)
    had = ws.cases[case_id].has_pseudo if case_id in ws.cases else False
    case, dropped = update_case(ws, case_id, pseudo, review_from)
    review = ", ".join(f"{n} {state}" for state, n in sorted(dropped.items()))
    say(f"case {case.id}: pseudo-label {'replaced' if had else 'added'} from {pseudo}; review states "
        + ("from " + str(review_from) if review_from else "reset to unreviewed")
        + (f" (dropped: {review})" if review else ""))


def show(ws: Workspace, args: argparse.Namespace) -> None:
    """`workspace show`: the case's montage (its pseudo-label by default, else the refined one, ground truth or
    the held-out label)."""
    from sslmedsam2.labelmap.pictures import is_our_picture
    from sslmedsam2.refine.rounds import refined_pseudo
    from sslmedsam2.study.show import parse_slices, show_case

    if args.case not in ws.cases:
        raise UserError(f"case {args.case!r} is not in the workspace {ws.root}")
    case = ws.cases[args.case]
    refined = refined_pseudo(ws, args.case)
    layers = {"pseudo": (ws.file(case.id, "pseudo"), ws.table(case.id)) if case.has_pseudo else None,
              "refined": refined,
              "label": (ws.file(case.id, "label"), None) if case.has_label else None,
              "eval": (ws.file(case.id, "eval"), None) if case.has_eval else None}
    layer = args.layer
    if layer == "auto":
        layer = next((name for name, found in layers.items() if found is not None), "image")
    elif layers[layer] is None:
        have = ", ".join(name for name, found in layers.items() if found) or "none"
        raise UserError(f"case {case.id} has no {layer} label map (it has: {have})")
    overlay, table = layers.get(layer) or (None, None)
    target = args.output or Path(f"{case.id}_{layer}.png")
    if target.suffix.lower() != ".png":
        raise UserError(f"-o {target}: a .png file")
    if (ws.root / "cases").resolve() in target.resolve().parents:
        raise UserError(f"-o {target}: not inside the workspace's cases")
    if target.exists() and not args.overwrite and not is_our_picture(target):
        raise UserError(f"{target} exists and was not written by sslmedsam2; pass --overwrite to replace it")
    if args.max < 1:
        raise UserError(f"--max {args.max}: at least 1")
    slices = parse_slices(args.slices) if args.slices else None
    report = show_case(ws, case.id, target, overlay, layer, table, slices, args.max)
    say(f"case {case.id}, {report.description}: slices {', '.join(map(str, report.slices)) or 'none'} -> {target}")


def review_slices(ws: Workspace, case_id: str, slices: str, state: str) -> None:
    """`workspace review`: set the state of the given slices ("3-7,12") of a case's pseudo-label."""
    from sslmedsam2.study.index import count_slices
    from sslmedsam2.study.review import SliceState
    from sslmedsam2.study.show import parse_slices

    if case_id not in ws.cases or not ws.cases[case_id].has_pseudo:
        raise UserError(f"case {case_id!r}: not in the workspace or without a pseudo-label")
    ws.check_complete([case_id])
    chosen = parse_slices(slices)
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
    say(f"case {case_id}: slices {_ranges(chosen)} are {state}")


def _ranges(slices: list[int]) -> str:
    """[3, 4, 5, 7] -> '3-5, 7'."""
    from sslmedsam2.cohort.shards import array_spec

    return array_spec(slices).replace(",", ", ")


def print_status(ws: Workspace, as_json: bool) -> None:
    """`workspace status`: cases (review counts, missing files), the refine job, and where its results are."""
    from collections import Counter

    from sslmedsam2.refine.rounds import current_outputs, refine_status

    cases = []
    for case in sorted(ws.cases.values(), key=lambda c: c.id):
        counts = Counter(s.value for s in ws.review(case.id))
        cases.append({"id": case.id, "ground_truth": case.has_label, "pseudo": case.has_pseudo,
                      "heldout": case.has_eval, "review": dict(sorted(counts.items())),
                      "files_missing": list(case.missing)})
    job = refine_status(ws)
    outputs = current_outputs(ws, job)
    summary = {"workspace": str(ws.root), "axis": ws.axis, "labels": ws.labels, "cases": cases,
               "refine": {"state": job.get("state", "not started"), "round": job.get("round"), "stage": job.get("stage"),
                          "rounds": job.get("rounds", []), "message": job.get("message", ""), "outputs": outputs}}
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
          + (f" ({r['stage']})" if r["state"] == "running" and r["stage"] else "")
          + (f" ({r['message']})" if r["message"] else ""))
    for line in _output_lines(ws, outputs):
        print(f"  {line}")


def _output_lines(ws: Workspace, outputs: dict) -> list[str]:
    lines = []
    if outputs["pseudo_labels_from"] != "workspace":
        lines.append(f"current pseudo-labels: {outputs['pseudo_labels']}/<case>.nii.gz ({outputs['pseudo_labels_from']}"
                     "; the workspace's own stay in cases/<case>/pseudo.nii.gz)")
    elif outputs["pseudo_labels"]:
        lines.append(f"current pseudo-labels: the workspace's, {outputs['pseudo_labels']} (no round has finished)")
    model = outputs["model"]
    if model:
        lines.append(f"current model: round {model['round']} ({model['configuration']}, fold {model['fold']}), "
                     f"{model['checkpoint']}; segment an image with `sslmedsam2 predict {ws.root} IMAGE -o OUT`")
    if outputs["last_round"]:
        lines.append(f"last round: {outputs['last_round']}/ (round.json, pseudo/, predicted/"
                     + (", overview/<case>.png" if outputs["overviews"] else "") + ")")
    if outputs["progress_plot"]:
        lines.append(f"progress plot: {outputs['progress_plot']}")
    return lines


def add_workspace_command(sub) -> None:
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
    m = wsub.add_parser("import", help="add the cases of a dataset folder (nnU-Net raw dataset, or images/ and "
                        "labels/)", description="Add every case of DIR: an nnU-Net raw dataset (dataset.json, "
                        "imagesTr/CASE_0000, labelsTr/CASE, imagesTs/: unlabelled, labelsTs/: held-out), a folder with "
                        "images/ and labels/ matched by file name, or a folder of images. Each case is added as "
                        "`workspace add` adds one; a line says what was added and what was skipped, and why. Run it "
                        "again to resume: cases already imported are skipped.")
    m.add_argument("workspace", type=Path)
    m.add_argument("folder", type=Path, metavar="DIR")
    m.add_argument("--labels", type=Path, metavar="FOLDER", help="label maps named like the images (e.g. "
                   "`pseudolabel`'s output folder) instead of DIR/labels")
    m.add_argument("--labels-as", default="label", choices=("label", "eval", "pseudo"), help="what the labels are: "
                   "ground truth (default), held-out labels (only score refine's rounds) or pseudo-labels (a "
                   "NAME.confidence.csv beside one gives its review state)")
    m.add_argument("--cases", metavar="NAMES", help="only these cases: comma-separated names or shell patterns, "
                   "e.g. 'hippocampus_00*'")
    add_uneven_option(m)
    u = wsub.add_parser("update", help="replace a case's pseudo-label (explicitly: `add` never does)",
                        description="Replace the pseudo-label of a case already in the workspace (or give it one). "
                        "Its review states start again: from --review-from's seeds, else unreviewed. The case's "
                        "folder is swapped in one step: a failure leaves the old pseudo-label.")
    u.add_argument("workspace", type=Path)
    u.add_argument("case")
    u.add_argument("--pseudo", type=Path, required=True, help="the new pseudo-label, on the case's image grid")
    u.add_argument("--review-from", type=Path, help="its .confidence.csv: drawn slices become 'seed'")
    v = wsub.add_parser("show", help="a PNG montage of a case's slices with its label map, review state and "
                        "confidence", description="Draw the slices of a case still to review, least confident "
                        "first (or --slices), with the label map in colour, the review state as the frame's colour "
                        "and the confidence per slice.")
    v.add_argument("workspace", type=Path)
    v.add_argument("case")
    v.add_argument("-o", "--output", type=Path, help="the PNG to write (default CASE_LAYER.png here)")
    v.add_argument("--layer", default="auto", choices=("auto", "pseudo", "refined", "label", "eval"),
                   help="the label map shown: the pseudo-label, the last refine round's, ground truth or the held-out "
                   "label (default: the first the case has, in that order)")
    v.add_argument("--slices", metavar="SPEC", help="these slices, e.g. 3-7,12 (default: those to review first)")
    v.add_argument("--max", type=int, default=12, metavar="N", help="at most N slices (default 12)")
    add_overwrite_option(v)
    s = wsub.add_parser("status", help="cases, review counts, the refine job's state and where its results are")
    s.add_argument("workspace", type=Path)
    s.add_argument("--json", action="store_true")
    r = wsub.add_parser("review", help="set the review state of slices of a case's pseudo-label")
    r.add_argument("workspace", type=Path)
    r.add_argument("case")
    r.add_argument("--slices", required=True, help="slice numbers and ranges along the workspace axis, e.g. 3-7,12")
    r.add_argument("--state", required=True, choices=("seed", "accepted", "rejected", "edited", "unreviewed"))
    w.set_defaults(func=cmd_workspace)
