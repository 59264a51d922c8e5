"""`pseudolabel --workspace WS`: few-shot inside the study. The cases with ground truth are the supports, the
cases without it (or those named) the queries, and each finished result becomes its case's pseudo-label, with its
confidence table (the order `workspace show` reviews slices in) and every slice unreviewed.

The job is fewshot.job's own: its inputs are the workspace's files under OUTDIR/inputs/, named by case id (hard
links where the file system allows, else copies), so that resume, shards, status files and ranking.csv work as
they do for folders. A case's pseudo-label made elsewhere is never replaced without `replace`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

from sslmedsam2.atomic import link_or_copy, write_text
from sslmedsam2.errors import UserError
from sslmedsam2.fewshot.job import output_files
from sslmedsam2.labelmap.confidence import pair_state
from sslmedsam2.provenance import table_mark
from sslmedsam2.study.dataset import match_cases
from sslmedsam2.study.workspace import Workspace, update_case
from sslmedsam2.volume.io import image_mark

INPUTS = "inputs"
STAGING_LOCK = ".staging.lock"
STAGING_MARK = ".sslmedsam2-inputs"


def default_output(ws: Workspace) -> Path:
    """Where a study's few-shot results go unless the user names a folder."""
    return ws.root / "pseudolabel"


@dataclass
class StudyCases:
    """The study's few-shot job: its supports and queries (case ids), and the cases left out (case -> why)."""

    supports: list[str]
    queries: list[str]
    left_out: dict[str, str] = field(default_factory=dict)


@dataclass
class Inputs:
    """The folders fewshot.job reads: the supports' images and labels, and the queries."""

    support_images: Path
    support_labels: Path
    queries: Path


def _query_file(outdir: Path, case_id: str) -> Path:
    return outdir / INPUTS / "queries" / f"{case_id}.nii.gz"


def result_in(outdir: Path, case_id: str) -> str | None:
    """The result id of the case's finished few-shot result in `outdir`; None when it has none."""
    files = output_files(outdir, _query_file(outdir, case_id))
    if pair_state(files["labels"]) != "complete":
        return None
    return table_mark(files["confidence"]).result


def _attached(ws: Workspace, outdir: Path, case_id: str) -> bool:
    """The case's pseudo-label is its result in `outdir`."""
    result = result_in(outdir, case_id)
    return result is not None and image_mark(ws.file(case_id, "pseudo")).result == result


def choose_cases(ws: Workspace, outdir: Path, named: list[str] | None, replace: bool) -> StudyCases:
    """Supports: the cases with ground truth. Queries: the cases without it (or those of `named`: names or shell
    patterns). A query that already has a pseudo-label from elsewhere is left out (a note says why), or refused
    when named, unless `replace`."""
    supports = sorted(c.id for c in ws.cases.values() if c.has_label)
    if not supports:
        raise UserError(f"{ws.root} has no case with ground truth; few-shot needs labelled cases as supports "
                        "(`sslmedsam2 workspace add --label` or `workspace import`)")
    if named:
        chosen = match_cases(sorted(ws.cases), named, f"the workspace {ws.root}")
        labelled = [c for c in chosen if ws.cases[c].has_label]
        if labelled:
            raise UserError(f"--cases: {', '.join(labelled)} {'has' if len(labelled) == 1 else 'have'} ground truth "
                            "(a support, not a query)")
    else:
        chosen = sorted(c.id for c in ws.cases.values() if not c.has_label)
    ws.check_complete(supports + chosen)
    cases = StudyCases(supports, [])
    for case_id in chosen:
        if ws.cases[case_id].has_pseudo and not replace and not _attached(ws, outdir, case_id):
            if named:
                raise UserError(f"case {case_id} already has a pseudo-label; add --replace to replace it with "
                                "few-shot's (its review states start again)")
            cases.left_out[case_id] = ("already has a pseudo-label from elsewhere, left as it is (`--cases "
                                       f"{case_id} --replace` replaces it)")
            continue
        cases.queries.append(case_id)
    if not cases.queries:
        raise UserError(f"no case of {ws.root} to pseudo-label: every case has ground truth or a pseudo-label "
                        "(name cases with --cases, and --replace to replace their pseudo-labels)")
    return cases


def stage_inputs(ws: Workspace, outdir: Path, cases: StudyCases) -> Inputs:
    """The job's input folders under OUTDIR/inputs/, holding exactly the chosen cases' files, named by case id.
    Shards stage the same set side by side (under a lock), so none removes what another reads. An inputs/ folder
    this function did not make (no marker file) is refused, never emptied."""
    root = outdir / INPUTS
    inputs = Inputs(root / "supports" / "images", root / "supports" / "labels", root / "queries")
    wanted = {inputs.support_images: {f"{c}.nii.gz": ws.file(c, "image") for c in cases.supports},
              inputs.support_labels: {f"{c}.nii.gz": ws.file(c, "label") for c in cases.supports},
              inputs.queries: {f"{c}.nii.gz": ws.file(c, "image") for c in cases.queries}}
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / STAGING_LOCK):
        marker = root / STAGING_MARK
        if not marker.is_file():  # files are removed below: only in a folder this function made
            if any(p.name != STAGING_LOCK for p in root.iterdir()):
                raise UserError(f"{root} exists and was not made by `pseudolabel --workspace`; choose another "
                                "output folder (-o)")
            write_text(marker, "the workspace's files for `sslmedsam2 pseudolabel --workspace`; made and emptied "
                               "by it\n")
        for folder, files in wanted.items():
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():
                if old.name not in files:
                    old.unlink()
            for name, source in files.items():
                target = folder / name
                if not (target.exists() and target.samefile(source)):
                    link_or_copy(source, target)
    return inputs


@dataclass
class Attached:
    """What attach_results did: the cases given their new pseudo-label, and those kept as they were (-> why)."""

    attached: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


def attach_results(ws: Workspace, outdir: Path, case_ids: list[str], replace: bool,
                   log: Callable[[str], None] = print) -> Attached:
    """Make each finished result in `outdir` its case's pseudo-label (a case already carrying it is left alone).
    A case whose pseudo-label is another one is replaced only when `replace`."""
    done = Attached()
    for case_id in case_ids:
        result = result_in(outdir, case_id)
        if result is None or _attached(ws, outdir, case_id):
            continue
        if ws.cases[case_id].has_pseudo and not replace:
            done.kept[case_id] = "it has another pseudo-label (--replace replaces it)"
            log(f"{case_id}: kept its pseudo-label; the new result stays in {outdir} (--replace attaches it)")
            continue
        files = output_files(outdir, _query_file(outdir, case_id))
        update_case(ws, case_id, files["labels"], review_from=files["confidence"])
        done.attached.append(case_id)
    return done
