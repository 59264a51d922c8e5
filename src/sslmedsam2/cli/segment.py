"""The segmentation commands: propagate, pseudolabel, evaluate, models, demo."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sslmedsam2.cli.options as options
from sslmedsam2.cli.options import (add_frame_options, add_method_option, add_model_options, add_overwrite_option,
                                    add_shard_option, add_uneven_option, say, settings_from, slice_list)
from sslmedsam2.atomic import stem
from sslmedsam2.errors import UserError
from sslmedsam2.models.registry import MODELS


def cmd_propagate(args: argparse.Namespace) -> int:
    from sslmedsam2.models.registry import DEFAULT_MODEL
    from sslmedsam2.session.files import run_propagate

    if args.token_file and not args.server:
        raise UserError("--token-file goes with --server")
    settings = settings_from(args)
    if not args.server and settings.model is None:
        settings.model = DEFAULT_MODEL  # with --server, None: the server's own model
    with options.ProgressBar("propagate") as bar:
        report = run_propagate(args.image, args.seeds, args.output, settings, log=say, progress=bar,
                               download_progress=True, overwrite=args.overwrite,
                               seed_slices=slice_list(args.seed_slices), allow_uneven=args.allow_uneven_slices,
                               server=args.server, token_file=args.token_file)
    how = f"SAM2 {report.model} on {report.device}" if report.method == "sam2" else "contour interpolation"
    say(f"{report.slices} slices, labels {report.labels}, {how}, {report.seconds:.1f} s -> {report.output} "
        f"(confidence: {report.confidence.name})")
    return 0


def cmd_pseudolabel(args: argparse.Namespace) -> int:
    from sslmedsam2.fewshot.job import PseudoLabelOptions

    if args.insertions < 1:
        raise UserError("--insertions must be at least 1")
    if args.supports is not None and args.supports < 1:
        raise UserError("--supports must be at least 1")
    folders = {"--support-images": args.support_images, "--support-labels": args.support_labels, "--query": args.query}
    if args.workspace is not None:
        if any(v is not None for v in folders.values()):
            raise UserError("--workspace takes the supports and queries from the study: leave out --support-images, "
                            "--support-labels and --query")
        return _pseudolabel_study(args)
    missing = [flag for flag, value in {**folders, "-o": args.output}.items() if value is None]
    if missing:
        raise UserError(f"pseudolabel: give {', '.join(missing)} (or --workspace WS)")
    if args.cases or args.replace:
        raise UserError("--cases and --replace go with --workspace")
    args.axis = args.axis or "axial"
    job = PseudoLabelOptions(support_images=args.support_images, support_labels=args.support_labels, query=args.query,
                             output=args.output, **_job_options(args))
    if _run_pseudolabel(job) is None:
        return 130
    return 0


def _job_options(args: argparse.Namespace) -> dict:
    from sslmedsam2.cohort.shards import parse_shard

    return dict(engine=settings_from(args).check(), insertions=args.insertions, seed=args.seed, supports=args.supports,
                shard=parse_shard(args.shard) if args.shard else None, naive=args.naive, redo=args.redo,
                allow_uneven=args.allow_uneven_slices, overwrite=args.overwrite)


def _run_pseudolabel(job, on_done=None) -> list[Path] | None:
    """Run the job under the cohort bars; None after an interrupt (its message is printed)."""
    from sslmedsam2.cli.cohort import Interrupted, run_shard
    from sslmedsam2.fewshot.job import run_pseudolabel

    written = run_shard(lambda bars: run_pseudolabel(job, log=bars.log, progress=bars.case, download_progress=True,
                                                     cases_bar=bars.cases, on_done=on_done), "pseudolabel")
    if isinstance(written, Interrupted):
        return None
    say(f"{len(written)} pseudo-labels written; review order in {job.output / 'ranking.csv'}")
    return written


def _pseudolabel_study(args: argparse.Namespace) -> int:
    """`pseudolabel --workspace WS`: the study's labelled cases as supports, each result its case's pseudo-label."""
    from sslmedsam2.cli.workspace import refuse_while_refining
    from sslmedsam2.fewshot.job import PseudoLabelOptions
    from sslmedsam2.fewshot.ranking import least_trustworthy_case
    from sslmedsam2.study.pseudolabel import attach_results, choose_cases, default_output, stage_inputs
    from sslmedsam2.study.workspace import Workspace

    ws = Workspace.open(args.workspace)
    refuse_while_refining(ws)
    if args.axis not in (None, ws.axis):
        raise UserError(f"--axis {args.axis}: the workspace's slices are reviewed along {ws.axis}; leave --axis out")
    args.axis = ws.axis
    outdir = args.output or default_output(ws)
    patterns = [c.strip() for c in args.cases.split(",") if c.strip()] if args.cases else None
    cases = choose_cases(ws, outdir, patterns, args.replace)
    for case_id, why in cases.left_out.items():
        say(f"{case_id}: {why}")
    say(f"supports: {len(cases.supports)} labelled case(s); queries: {len(cases.queries)} case(s) -> {outdir}")
    inputs = stage_inputs(ws, outdir, cases)
    job = PseudoLabelOptions(support_images=inputs.support_images, support_labels=inputs.support_labels,
                             query=inputs.queries, output=outdir, **_job_options(args))
    attached: list[str] = []

    def attach(query: Path) -> None:
        attached.extend(attach_results(ws, outdir, [stem(query)], args.replace, log=say).attached)

    written = _run_pseudolabel(job, attach)
    if attached:
        say(f"{len(attached)} cases of {ws.root} have their few-shot pseudo-label (every slice unreviewed)")
    first = least_trustworthy_case(outdir)
    if written is None:
        return 130
    if first is not None:
        say(f"review first: {stem(Path(first))} (`sslmedsam2 workspace show {ws.root} {stem(Path(first))}`)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sslmedsam2.metrics.evaluate import evaluate_paths, scores_table, write_scores_csv

    if args.csv is not None:
        from sslmedsam2.volume.io import check_table_output

        check_table_output(args.csv, (args.pred, args.gt), args.overwrite)
    names = _label_names(args)
    results, unmatched = evaluate_paths(args.pred, args.gt)
    for name in unmatched:
        say(f"{name}: present in one folder only, not scored")
    print(scores_table(results, names))
    if args.csv is not None:
        write_scores_csv(results, args.csv, names)
    return 0


def _label_names(args: argparse.Namespace) -> dict[int, str]:
    """Value -> name: --labels, else the workspace's (--workspace, or the one PRED or GT lies in)."""
    from sslmedsam2.study.workspace import Workspace, find_workspace, parse_labels

    if args.labels:
        pairs = [item.strip() for text in args.labels for item in text.split(",") if item.strip()]
        return {v: n for n, v in parse_labels(pairs).items()}
    root = args.workspace or find_workspace(args.pred, args.gt)
    return {} if root is None else {v: n for n, v in Workspace.open(root, allow_missing=True).labels.items()}


def cmd_models(args: argparse.Namespace) -> int:
    from sslmedsam2.models.cache import cache_dir, cached_path, is_cached

    rows = [{"name": s.name, "image_size": s.image_size, "size_mb": round(s.size_bytes / 1e6), "cached": is_cached(s),
             "path": str(cached_path(s)), "url": s.url, "sha256": s.sha256, "note": s.note} for s in MODELS.values()]
    if args.json:
        print(json.dumps({"cache": str(cache_dir()), "models": rows}, indent=2))
        return 0
    print(f"cache: {cache_dir()}  (set SSLMEDSAM2_CACHE to move it)")
    for r in rows:
        state = "cached" if r["cached"] else "not downloaded"
        print(f"  {r['name']:<18} {r['image_size']:>5}px {r['size_mb']:>5} MB  {state:<15} {r['note']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sslmedsam2.demo import run_demo

    with options.ProgressBar("propagate") as bar:
        run_demo(args.output, settings_from(args), log=say, progress=bar, download_progress=True)
    return 0


def add_segment_commands(sub) -> None:
    p = sub.add_parser("propagate", help="seed slices -> full 3D label map",
                       description="Propagate the drawn slices of SEEDS through IMAGE. Writes OUTPUT (a label map on "
                       "the image grid) and OUTPUT's name + .confidence.csv (per slice and label).")
    p.add_argument("image", type=Path, help="3D image: .nii/.nii.gz/.nrrd/.mha or a DICOM series folder")
    p.add_argument("seeds", type=Path, help="label map on the image grid with a few drawn slices (any labels)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output label map (suffix picks the format; "
                   "no suffix: DICOM series folder)")
    add_method_option(p)
    p.add_argument("--seed-slices", help="use only these slices of SEEDS as prompts, e.g. 3,10,17 (re-propagation "
                   "from reviewed slices); default: every slice with a label")
    p.add_argument("--server", metavar="URL", help="run on an `sslmedsam2 serve` server (e.g. a GPU machine through "
                   "an SSH tunnel: http://127.0.0.1:8765); --model and --image-size then default to the server's")
    p.add_argument("--token-file", type=Path, help="with --server: a file holding the server's access token")
    add_overwrite_option(p)
    add_uneven_option(p)
    add_model_options(p)
    add_frame_options(p)
    p.set_defaults(func=cmd_propagate, model=None)

    f = sub.add_parser("pseudolabel", help="few-shot pseudo-labels for unlabelled volumes from labelled supports",
                       description="Training-free few-shot (TFFS): each support volume is inserted whole into each query "
                       "at K positions, SAM2 propagates the support's labels into the query (no prompt on the query), "
                       "and the videos' probabilities are averaged. Writes OUTDIR/<query file>, .prob_<label>, "
                       ".uncertainty, .confidence.csv, .case.json and overview/<name>.png per query, and OUTDIR/ranking.csv "
                       "(review order); "
                       "OUTDIR/cohort.json and a status file per shard (see `sslmedsam2 cohort status`). "
                       "A rerun resumes: finished queries are skipped. With --workspace WS, the study's cases with "
                       "ground truth are the supports, those without it the queries, and each result becomes its "
                       "case's pseudo-label as it is finished.")
    f.add_argument("--support-images", type=Path, help="folder of labelled support images")
    f.add_argument("--support-labels", type=Path, help="their label maps, same file names")
    f.add_argument("--query", type=Path, help="folder of unlabelled query images")
    f.add_argument("-o", "--output", type=Path, help="output folder (not the query folder; with --workspace, "
                   "default WS/pseudolabel)")
    study = f.add_argument_group("inside a study workspace")
    study.add_argument("--workspace", type=Path, metavar="WS", help="supports: WS's cases with ground truth; queries: "
                   "those without (but not those with a pseudo-label from elsewhere); each result becomes its "
                   "case's pseudo-label with its confidence table, every slice unreviewed (slices along the "
                   "workspace's axis)")
    study.add_argument("--cases", metavar="NAMES", help="only these queries: comma-separated case ids or shell patterns")
    study.add_argument("--replace", action="store_true", help="replace the pseudo-labels the queries already have "
                   "(their review states start again); without it they are kept")
    f.add_argument("--insertions", type=int, default=5, help="positions each support is inserted at (default 5)")
    f.add_argument("--seed", type=int, default=42, help="seed of the insertion positions (default 42)")
    f.add_argument("--supports", type=int, help="use the N supports most similar to each query (default: all)")
    add_shard_option(f, "query")
    f.add_argument("--redo", action="store_true", help="recompute finished cases in OUTDIR that were made with other "
                   "settings (model, image size, insertions, seed, supports, axis, intensity); without it such a "
                   "folder is refused")
    f.add_argument("--naive", action="store_true", help="compute every video in full, as the reference code does "
                   "(same result, several times slower; for comparison)")
    add_overwrite_option(f)
    add_uneven_option(f)
    add_model_options(f)
    add_frame_options(f)
    f.set_defaults(func=cmd_pseudolabel, axis=None)  # with --workspace, the workspace's axis; else axial

    e = sub.add_parser("evaluate", help="Dice, HD95 and ASSD (mm) per label",
                       description="Compare PRED with GT: two label maps, or two folders matched by file name.")
    e.add_argument("pred", type=Path)
    e.add_argument("gt", type=Path)
    e.add_argument("--csv", type=Path, help="also write one row per case and label (case,label,dice,hd95,assd; with "
                   "label names, a column name after label); a label absent from both maps of a case scores dice 1, "
                   "hd95 0, assd 0; absent from one only: dice 0, hd95 and assd nan (no surface to measure to)")
    e.add_argument("--workspace", type=Path, metavar="WS", help="name the labels as this workspace does (default: "
                   "the workspace PRED or GT lies in, if any)")
    e.add_argument("--labels", action="append", metavar="NAME=VALUE,...", help="name the labels, e.g. "
                   "anterior=1,posterior=2")
    add_overwrite_option(e)
    e.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("models", help="known SAM2 weights and whether they are downloaded")
    m.add_argument("--json", action="store_true", help="machine-readable listing")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("demo", help="run on the hippocampus sample shipped with the package",
                       description="Propagate the drawn coronal slices (every 5th of each structure) of a shipped hippocampus MRI, score the "
                       "result against its full manual label and draw a picture.")
    d.add_argument("-o", "--output", type=Path, default=Path("sslmedsam2-demo"), help="output folder")
    add_method_option(d)
    add_model_options(d)
    d.set_defaults(func=cmd_demo, axis="axial", modality="mri", window="soft-tissue", intensity_range=None)
