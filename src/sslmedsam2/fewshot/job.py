"""`sslmedsam2 pseudolabel`: every query in a folder, resumable, shardable, ranked for review."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from filelock import FileLock

from sslmedsam2.atomic import remove_stale_temporaries, same_path, stem, write_text
from sslmedsam2.cohort.run import ShardRun, take_shard
from sslmedsam2.cohort.shards import sorted_cases
from sslmedsam2.cohort.status import STATUS_DIR, CaseFiles, write_manifest
from sslmedsam2.errors import UserError
from sslmedsam2.fewshot.fusion import PseudoLabel
from sslmedsam2.fewshot.insertions import insertion_positions
from sslmedsam2.fewshot.ranking import RANKING, write_ranking
from sslmedsam2.fewshot.similarity import most_similar
from sslmedsam2.fewshot.volumes import check_label_sets, list_images, load_volume, pair_supports
from sslmedsam2.settings import EngineSettings
from sslmedsam2.labelmap.confidence import pair_state, write_result
from sslmedsam2.labelmap.pictures import draw_result, overview_path
from sslmedsam2.provenance import table_mark
from sslmedsam2.volume import write_images
from sslmedsam2.volume.slices import SliceVolume
from sslmedsam2.jobs import Progress
from sslmedsam2.volume.io import check_geometry_fits, check_replaceable, check_table_output, image_mark


@dataclass
class PseudoLabelOptions:
    support_images: Path
    support_labels: Path
    query: Path
    output: Path
    engine: EngineSettings = field(default_factory=lambda: EngineSettings(method="sam2"))
    insertions: int = 5
    seed: int = 42
    supports: int | None = None  # the N most similar supports per query; None: all
    shard: tuple[int, int] | None = (1, 1)  # (I, N), 1-based; None: from the scheduler's array variables
    naive: bool = False  # the reference's per-video computation (for comparison)
    redo: bool = False  # recompute finished cases made with other settings (else such a folder is refused)
    allow_uneven: bool = False  # accept DICOM series with missing slices or uneven spacing
    overwrite: bool = False  # replace files of the queries' output names that this tool did not write

    def settings(self, support_files: list[str]) -> dict:
        """What a finished case's result depends on: a resumed run must not mix results of other settings.
        (--naive is left out: it gives the same numbers.)"""
        engine = self.engine
        record = {"model": engine.spec.name, "checkpoint": str(engine.checkpoint) if engine.checkpoint else None,
                  "image_size": engine.size, "insertions": self.insertions, "seed": self.seed,
                  "supports": self.supports, "support_files": sorted(support_files), "axis": engine.axis,
                  "intensity": asdict(engine.intensity)}
        return json.loads(json.dumps(record))


def output_files(outdir: Path, query: Path) -> dict[str, Path]:
    name = stem(query)
    return {"labels": outdir / query.name, "uncertainty": outdir / f"{name}.uncertainty.nii.gz",
            "confidence": outdir / f"{name}.confidence.csv", "case": outdir / f"{name}.case.json"}


def is_done(outdir: Path, query: Path) -> bool:
    """The label map is written last, atomically and verified, with its confidence table as one result: a
    complete pair means every other file of the case is complete."""
    files = output_files(outdir, query)
    return files["case"].exists() and pair_state(files["labels"]) == "complete"


def check_outputs_replaceable(outdir: Path, query: Path, overwrite: bool) -> None:
    """Files of a query's output names that this tool did not write are replaced only with --overwrite."""
    files = output_files(outdir, query)
    check_replaceable(files["labels"], image_mark(files["labels"]).ours, overwrite)
    check_replaceable(files["uncertainty"], image_mark(files["uncertainty"]).ours, overwrite)
    check_replaceable(files["confidence"], table_mark(files["confidence"]).ours, overwrite)


def mismatched_cases(outdir: Path, settings: dict) -> dict[str, list[str]]:
    """Finished cases in `outdir` made with other settings: {query file: the settings that differ}."""
    found = {}
    for case_file in sorted(outdir.glob("*.case.json")):
        try:
            info = json.loads(case_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not (outdir / str(info.get("query_file"))).exists():
            continue
        used = info.get("settings") or {}
        differ = [key for key in settings if used.get(key) != settings[key]]
        if differ:
            found[info["query_file"]] = differ
    return found


def write_case(outdir: Path, query: SliceVolume, result: PseudoLabel, info: dict) -> None:
    files = output_files(outdir, query.path)
    maps = [(query.to_image(result.probabilities[i].astype(np.float32)), outdir / f"{stem(query.path)}.prob_{label}.nii.gz")
            for i, label in enumerate(info["labels"])]
    write_images([*maps, (query.to_image(result.uncertainty.astype(np.float32)), files["uncertainty"])])
    write_text(files["case"], json.dumps({**info, "case_confidence": result.case_confidence}, indent=2))
    label_map = query.to_image(result.labels)
    draw_result(query.to_image(query.slices), label_map, overview_path(outdir, query.path),
                f"{query.path.name}: few-shot pseudo-label, case confidence {result.case_confidence:.3f}",
                query.grid.axis)
    write_result(label_map, files["labels"], result.confidence)  # the table, then the map


def run_pseudolabel(options: PseudoLabelOptions, log: Callable[[str], None] = print, progress: Progress | None = None,
                    download_progress=False, cases_bar: Progress | None = None,
                    on_done: Callable[[Path], None] | None = None) -> list[Path]:
    """Pseudo-label every unfinished query of this shard; returns the label maps written by this run. `on_done`
    is called with each query of the shard (its path) once its result is complete, also for those finished before.

    The shard is options.shard, or (None) the scheduler's array task (sslmedsam2.cohort.shards). Each case's
    start and end go to the shard's status file; a query whose voxels cannot be read is recorded as failed and the
    shard goes on (a UserError at the end names the failed cases); a failure of the tracking or of a write stops
    the shard. Ctrl-C or a stop signal raises cohort.run.ShardInterrupted once the writes under way have ended."""
    from sslmedsam2.fewshot.engine import FewShotEngine

    outdir = Path(options.output)
    for what, folder in (("query", options.query), ("support images", options.support_images),
                         ("support labels", options.support_labels)):
        if same_path(outdir, Path(folder)):
            raise UserError(f"the output folder is the {what} folder; outputs take the queries' file names and "
                            "would overwrite its files: choose another folder")
    pairs = pair_supports(options.support_images, options.support_labels)
    every = sorted_cases(list_images(options.query, "query"))
    shard, queries = take_shard(outdir, "pseudolabel", every, options.shard, options.overwrite, log, "query")
    settings = options.settings([image.name for image, _ in pairs])
    outdir.mkdir(parents=True, exist_ok=True)
    check_table_output(outdir / RANKING, overwrite=options.overwrite)
    mismatched = mismatched_cases(outdir, settings)
    if mismatched and not options.redo:
        first, differ = next(iter(mismatched.items()))
        raise UserError(f"{outdir} holds {len(mismatched)} finished case(s) made with other settings ({first}: "
                        f"{', '.join(differ)}); use another output folder, the same settings, or --redo to recompute them")
    if remove_stale_temporaries(outdir):
        log("removed temporary files left by an interrupted run")
    axis, intensity = options.engine.axis, options.engine.intensity
    supports = [load_volume(image, axis, intensity, label, options.allow_uneven)
                for image, label in pairs]
    labels = check_label_sets(supports)
    todo = [q for q in queries if not is_done(outdir, q) or q.name in mismatched]
    for query in todo:
        check_outputs_replaceable(outdir, query, options.overwrite)
    write_manifest(outdir, "pseudolabel", options.query,
                   [CaseFiles(q.name, q.name, output_files(outdir, q)["case"].name) for q in every], shard)
    if len(todo) < len(queries):
        log(f"resuming: {len(queries) - len(todo)} of {len(queries)} queries of this shard are already done")
    for query in queries:
        if on_done is not None and query not in todo:
            on_done(query)
    by_name = {q.name: q for q in queries}
    run = ShardRun(outdir, shard, list(by_name), lambda name: is_done(outdir, by_name[name]), cases_bar)
    written: list[Path] = []
    if todo:
        try:
            engine = FewShotEngine(options, supports, labels, log, download_progress)
            _track_and_write(engine, options, run, todo, supports, labels, settings, written, log, progress,
                             on_done)
        except KeyboardInterrupt as exc:
            raise run.interrupted(exc) from None
        except BaseException as exc:
            run.settle(exc)
            raise
    (outdir / STATUS_DIR).mkdir(exist_ok=True)
    with FileLock(outdir / STATUS_DIR / "ranking.lock"):  # the last shard to get here sees every finished case
        write_ranking(outdir)
    failure = run.failure()
    if failure is not None:
        raise failure
    return written


def _track_and_write(engine, options: PseudoLabelOptions, run: ShardRun, todo: list[Path], supports: list[SliceVolume],
                     labels: list[int], settings: dict, written: list[Path], log: Callable[[str], None],
                     progress: Progress | None, on_done: Callable[[Path], None] | None) -> None:
    """Read, track and write the queries `todo`, in groups that fit the device; a group's files are written while
    the next group is read and tracked (one group at a time is pending)."""
    outdir, axis, intensity = Path(options.output), options.engine.axis, options.engine.intensity
    group: list[tuple[Path, SliceVolume, list[str], dict, int]] = []  # ..., the query's GPU bytes
    pending: list[tuple[Future, Path, str, float]] = []  # the write, the query, the line to log, seconds

    def collect() -> None:
        """Wait for the pending writes; a failed one stops the job here (its case is not done: a rerun redoes it)."""
        while pending:
            future, path, line, seconds = pending[0]
            future.result()
            pending.pop(0)
            written.append(output_files(outdir, path)["labels"])
            run.done(path.name, seconds)
            log(line)
            if on_done is not None:
                on_done(path)

    def finish_group() -> None:
        """Pseudo-label the queries gathered (one batch per support on a GPU), then write each case."""
        started = time.perf_counter()
        results = engine.pseudo_label_many([q for _, q, _, _, _ in group], [p for _, _, _, p, _ in group],
                                           progress)
        seconds = round((time.perf_counter() - started) / len(group), 2)
        collect()
        for (path, query, chosen, positions, _), result in zip(group, results):
            info = {"query_file": path.name, "labels": labels, "supports": chosen, "insertions": positions,
                    "videos": sum(len(p) for p in positions.values()), "seconds": seconds,
                    "model": options.engine.spec.name, "image_size": engine.image_size, "naive": options.naive,
                    "settings": settings}
            line = (f"{path.name}: {info['videos']} videos from {len(chosen)} supports, case confidence "
                    f"{result.case_confidence:.3f}, {seconds:.1f} s" + (f" (one of {len(group)} queries "
                                                                      "tracked together)" if len(group) > 1 else ""))
            pending.append((writer.submit(write_case, outdir, query, result, info), path, line, seconds))
        group.clear()

    run.begin(len(todo))
    # leaving the block waits for the writes under way, also when tracking failed or was interrupted
    with ThreadPoolExecutor(1, thread_name_prefix="sslmedsam2-write") as writer:
        for path in todo:
            run.started(path.name)
            try:
                query = load_volume(path, axis, intensity, allow_uneven=options.allow_uneven)
                check_geometry_fits(query.grid, output_files(outdir, path)["labels"], what=str(path))
            except UserError as exc:  # this query's own fault: the others go on
                log(f"{path.name}: failed ({run.fail(path.name, exc)}); going on with the next query")
                continue
            chosen = most_similar(query.slices, {s.name: s.slices for s in supports}, options.supports)
            positions = {name: insertion_positions(query.name, name, len(query.slices), options.insertions,
                                                   options.seed) for name in chosen}
            cost = engine.query_bytes(len(query.slices), max(map(len, positions.values()), default=0))
            if group and not engine.fits([c for *_, c in group] + [cost]):
                finish_group()
            group.append((path, query, chosen, positions, cost))
            if not engine.fits([c for *_, c in group] + [cost]):  # no room for another like it: go now
                finish_group()
        if group:
            finish_group()
        collect()
