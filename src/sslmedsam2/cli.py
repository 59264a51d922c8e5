"""The `sslmedsam2` command: propagate, pseudolabel, evaluate, models, demo (study commands: cli_study)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import warnings
from pathlib import Path

from sslmedsam2 import __version__
from sslmedsam2.errors import UserError, WorkerError
from sslmedsam2.frames import CT_WINDOWS, IntensitySpec
from sslmedsam2.models.registry import DEFAULT_MODEL, MODELS
from sslmedsam2.pipeline import METHODS, PropagateOptions
from sslmedsam2.volume import SliceAxis
from sslmedsam2.volume.geometry import GeometryWarning


def _say(message: str) -> None:
    print(f"sslmedsam2: {message}", file=sys.stderr, flush=True)


class _ProgressBar:
    """A tqdm bar that appears only once work with a known size starts (nothing for a 1-second interpolation)."""

    def __init__(self, desc: str, unit: str = "slice") -> None:
        self.desc, self.unit = desc, unit
        self.bar = None

    def reset(self, total: int | None = None) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(desc=self.desc, unit=self.unit, total=total, file=sys.stderr, dynamic_ncols=True)
        else:
            self.bar.reset(total=total)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"SAM2 weights by name (default {DEFAULT_MODEL}; "
                        "see `sslmedsam2 models`)")
    parser.add_argument("--checkpoint", type=Path, help="a local checkpoint file instead of the cached download")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"),
                        help="auto: cuda, then mps, then cpu (bf16 autocast on cuda)")
    parser.add_argument("--image-size", type=int, help="SAM2 input size (multiple of 16); smaller is faster, "
                        "coarser (default: the model's own, 1024 or 512)")
    parser.add_argument("--no-download", action="store_true", help="never download weights")
    parser.add_argument("--compile", action="store_true", help="compile SAM2's tracking step (torch.compile; CUDA "
                        "graphs on a GPU, where a step is bound by its latency): tens of seconds once per shape, then "
                        "cached on disk; for a GPU and long volumes or a long-lived server, not for a CPU")


def _add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files that sslmedsam2 did "
                        "not write (without it they are refused; its own earlier outputs are always replaced)")


def add_uneven_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-uneven-slices", action="store_true", help="read a DICOM series whose slices are "
                        "unevenly spaced or have gaps (missing slices) with an even spacing, saying so; without it "
                        "such a series is refused with the slice positions that are wrong")


def _add_frame_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--axis", default="axial", choices=[a.value for a in SliceAxis],
                        help="slicing plane, found from the image's direction cosines (default axial)")
    parser.add_argument("--modality", default="mri", choices=("mri", "ct"),
                        help="mri: clip to the 0.5/99.5 percentiles of non-zero voxels; ct: a window")
    parser.add_argument("--window", default="soft-tissue", choices=tuple(CT_WINDOWS), help="CT window (default soft-tissue)")
    parser.add_argument("--intensity-range", nargs=2, type=float, metavar=("MIN", "MAX"),
                        help="explicit intensity range, overriding --modality")


def _intensity(args: argparse.Namespace) -> IntensitySpec:
    return IntensitySpec(modality=args.modality, window=args.window,
                         value_range=tuple(args.intensity_range) if args.intensity_range else None)


def _options(args: argparse.Namespace) -> PropagateOptions:
    return PropagateOptions(method=args.method, model=args.model or DEFAULT_MODEL, checkpoint=args.checkpoint,
                            device=args.device, image_size=args.image_size, axis=args.axis, intensity=_intensity(args),
                            download=not args.no_download, seed_slices=_slice_list(getattr(args, "seed_slices", None)),
                            compile=args.compile, allow_uneven=getattr(args, "allow_uneven_slices", False))


def _slice_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--seed-slices {text!r}: a comma-separated list of slice numbers") from None


def cmd_propagate(args: argparse.Namespace) -> int:
    from sslmedsam2.pipeline import run_propagate

    if args.token_file and not args.server:
        raise UserError("--token-file goes with --server")
    if args.server:
        from sslmedsam2.server.remote import run_propagate_remote

        options = _options(args)
        options.model = args.model  # None: the server's own model
        with _ProgressBar("propagate") as bar:
            report = run_propagate_remote(args.image, args.seeds, args.output, options, args.server, args.token_file,
                                          log=_say, progress=bar, overwrite=args.overwrite)
    else:
        with _ProgressBar("propagate") as bar:
            report = run_propagate(args.image, args.seeds, args.output, _options(args), log=_say, progress=bar,
                                   download_progress=True, overwrite=args.overwrite)
    how = f"SAM2 {report.model} on {report.device}" if report.method == "sam2" else "contour interpolation"
    _say(f"{report.slices} slices, labels {report.labels}, {how}, {report.seconds:.1f} s -> {report.output} "
         f"(confidence: {report.confidence.name})")
    return 0


def cmd_pseudolabel(args: argparse.Namespace) -> int:
    from sslmedsam2.fewshot.job import PseudoLabelOptions, parse_shard, run_pseudolabel

    if args.insertions < 1:
        raise UserError("--insertions must be at least 1")
    if args.supports is not None and args.supports < 1:
        raise UserError("--supports must be at least 1")
    options = PseudoLabelOptions(
        support_images=args.support_images, support_labels=args.support_labels, query=args.query, output=args.output,
        model=args.model, checkpoint=args.checkpoint, device=args.device, image_size=args.image_size,
        insertions=args.insertions, seed=args.seed, supports=args.supports, shard=parse_shard(args.shard),
        axis=args.axis, intensity=_intensity(args), download=not args.no_download, naive=args.naive,
        redo=args.redo, compile=args.compile, allow_uneven=args.allow_uneven_slices, overwrite=args.overwrite)
    with _ProgressBar("pseudolabel", unit="slice") as bar:
        written = run_pseudolabel(options, log=_say, progress=bar, download_progress=True)
    _say(f"{len(written)} pseudo-labels written; review order in {args.output / 'ranking.csv'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from sslmedsam2.metrics.evaluate import evaluate_paths, scores_table, write_scores_csv

    if args.csv is not None:
        from sslmedsam2.volume.io import check_table_output

        check_table_output(args.csv, (args.pred, args.gt), args.overwrite)
    results, unmatched = evaluate_paths(args.pred, args.gt)
    for name in unmatched:
        _say(f"{name}: present in one folder only, not scored")
    print(scores_table(results))
    if args.csv is not None:
        write_scores_csv(results, args.csv)
    return 0


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

    with _ProgressBar("propagate") as bar:
        run_demo(args.output, _options(args), log=_say, progress=bar, download_progress=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslmedsam2", description="Draw a few slices, get the whole 3D "
                                     "segmentation: SAM2 propagation through medical volumes.")
    parser.add_argument("--version", action="version", version=f"sslmedsam2 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("propagate", help="seed slices -> full 3D label map",
                       description="Propagate the drawn slices of SEEDS through IMAGE. Writes OUTPUT (a label map on "
                       "the image grid) and OUTPUT's name + .confidence.csv (per slice and label).")
    p.add_argument("image", type=Path, help="3D image: .nii/.nii.gz/.nrrd/.mha or a DICOM series folder")
    p.add_argument("seeds", type=Path, help="label map on the image grid with a few drawn slices (any labels)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output label map (suffix picks the format; "
                   "no suffix: DICOM series folder)")
    p.add_argument("--method", default="auto", choices=METHODS, help="sam2, interpolate (no weights needed) or auto "
                   "(default: sam2 when weights can be had, else interpolate, saying so)")
    p.add_argument("--seed-slices", help="use only these slices of SEEDS as prompts, e.g. 3,10,17 (re-propagation "
                   "from reviewed slices); default: every slice with a label")
    p.add_argument("--server", metavar="URL", help="run on an `sslmedsam2 serve` server (e.g. a GPU machine through "
                   "an SSH tunnel: http://127.0.0.1:8765); --model and --image-size then default to the server's")
    p.add_argument("--token-file", type=Path, help="with --server: a file holding the server's access token")
    _add_overwrite_option(p)
    add_uneven_option(p)
    _add_model_options(p)
    _add_frame_options(p)
    p.set_defaults(func=cmd_propagate, model=None)

    f = sub.add_parser("pseudolabel", help="few-shot pseudo-labels for unlabelled volumes from labelled supports",
                       description="Training-free few-shot (TFFS): each support volume is inserted whole into each query "
                       "at K positions, SAM2 propagates the support's labels into the query (no prompt on the query), "
                       "and the videos' probabilities are averaged. Writes OUTDIR/<query file>, .prob_<label>, "
                       ".uncertainty, .confidence.csv and .case.json per query, and OUTDIR/ranking.csv (review order). "
                       "A rerun resumes: finished queries are skipped.")
    f.add_argument("--support-images", type=Path, required=True, help="folder of labelled support images")
    f.add_argument("--support-labels", type=Path, required=True, help="their label maps, same file names")
    f.add_argument("--query", type=Path, required=True, help="folder of unlabelled query images")
    f.add_argument("-o", "--output", type=Path, required=True, help="output folder (not the query folder)")
    f.add_argument("--insertions", type=int, default=5, help="positions each support is inserted at (default 5)")
    f.add_argument("--seed", type=int, default=42, help="seed of the insertion positions (default 42)")
    f.add_argument("--supports", type=int, help="use the N supports most similar to each query (default: all)")
    f.add_argument("--shard", default="1/1", help="I/N: this job takes every N-th query from the I-th (1-based)")
    f.add_argument("--redo", action="store_true", help="recompute finished cases in OUTDIR that were made with other "
                   "settings (model, image size, insertions, seed, supports, axis, intensity); without it such a "
                   "folder is refused")
    f.add_argument("--naive", action="store_true", help="compute every video in full, as the reference code does "
                   "(same result, several times slower; for comparison)")
    _add_overwrite_option(f)
    add_uneven_option(f)
    _add_model_options(f)
    _add_frame_options(f)
    f.set_defaults(func=cmd_pseudolabel)

    e = sub.add_parser("evaluate", help="Dice, HD95 and ASSD (mm) per label",
                       description="Compare PRED with GT: two label maps, or two folders matched by file name.")
    e.add_argument("pred", type=Path)
    e.add_argument("gt", type=Path)
    e.add_argument("--csv", type=Path, help="also write one row per case and label (case,label,dice,hd95,assd); a "
                   "label absent from both maps of a case scores dice 1, hd95 0, assd 0; absent from one only: dice 0, "
                   "hd95 and assd nan (no surface to measure to)")
    _add_overwrite_option(e)
    e.set_defaults(func=cmd_evaluate)

    from sslmedsam2.cli_study import add_study_commands

    add_study_commands(sub)

    from sslmedsam2.server.main import add_serve_command

    add_serve_command(sub, _add_model_options)

    m = sub.add_parser("models", help="known SAM2 weights and whether they are downloaded")
    m.add_argument("--json", action="store_true", help="machine-readable listing")
    m.set_defaults(func=cmd_models)

    d = sub.add_parser("demo", help="run on the hippocampus sample shipped with the package",
                       description="Propagate the drawn coronal slices (every 5th of each structure) of a shipped hippocampus MRI, score the "
                       "result against its full manual label and draw a picture.")
    d.add_argument("-o", "--output", type=Path, default=Path("sslmedsam2-demo"), help="output folder")
    d.add_argument("--method", default="auto", choices=METHODS)
    _add_model_options(d)
    d.set_defaults(func=cmd_demo, axis="axial", modality="mri", window="soft-tissue", intensity_range=None)
    return parser


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwound like Ctrl-C, so that every temporary file is removed on the way out."""


def _stop(signum: int, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP clean up as SIGINT does (a signal the parent ignores, nohup's SIGHUP, stays ignored);
    commands with a stop of their own (refine, serve) install theirs over these."""
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            signal.signal(number, _stop)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, GeometryWarning):
        _say(f"warning: {message}")
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _stop_on_signals()
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", GeometryWarning)
    try:
        return args.func(args)
    except (UserError, WorkerError) as exc:
        _say(f"error: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        how = f"stopped by {exc.args[0]}" if isinstance(exc, Stopped) and exc.args else "interrupted"
        _say(f"{how}; no output was written")
        return 130
    except OSError as exc:  # a read-only folder, a full disk: the environment, not a bug
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"error: {where}{exc.strerror or exc}")
        return 1
    except MemoryError:
        _say("error: out of memory; no output was written: lower --image-size or close other programs")
        return 1
    except RuntimeError as exc:
        if type(exc).__name__ != "OutOfMemoryError":  # torch's; named so that torch-free commands need no torch
            raise
        _say("error: out of GPU memory; no output was written: lower --image-size or use --device cpu")
        return 1
