"""`sslmedsam2 refine WS`: train nnU-Net on ground truth + pseudo-labels, predict, replace, repeat until stable.

Each round's steps (export, plan, train, predict, sam2 with --sam2-from-nnunet, score) leave markers; a rerun
after a crash or a kill skips what is done, and nnU-Net continues an interrupted training from its own latest
checkpoint. A stop request (the file WS/refine/stop, written by `refine --cancel` and the Slicer module) stops it at
the next safe point (an epoch's end, between steps or cases). SIGINT (Ctrl-C) and SIGTERM stop it at once: every
file a round writes is written atomically and every step is redone until it is recorded as done, so the job
unwinds from wherever it is (a training iteration, a case's prediction) and the next run resumes. The running job
holds WS/refine/.lock (filelock: portable, dropped by the OS when the process ends). Nothing here writes ground
truth, pseudo-labels or review state in the workspace: rounds write under WS/refine/ (`current_outputs` says
where the current pseudo-labels, model and pictures are).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from filelock import Timeout

from sslmedsam2.jobs import Cancelled
from sslmedsam2.atomic import write_text
from sslmedsam2.errors import UserError
from sslmedsam2.metrics.surface import dice, mean_dice
from sslmedsam2.refine import nnunet
from sslmedsam2.refine.events import EventLog, clear_stop_request, job_lock, job_running, now, stop_requested
from sslmedsam2.refine.export import export_round
from sslmedsam2.study.review import IGNORE_POLICIES, human_slices
from sslmedsam2.study.workspace import Workspace
from sslmedsam2.volume import read_label_map, slice_axis, write_image

NNUNET_FOLDS = 5  # nnU-Net's cross-validation: KFold(5) over the training cases, so --fold 0-4 needs 5 of them
LOCK_WAIT_S = 10.0  # a liveness probe holds the lock for an instant: a starting job waits that out
STOP_SIGNALS = ("SIGINT", "SIGTERM")


class _Stop(BaseException):
    """Raised by the signal handler where the job computes: unwinds past any `except Exception` in nnU-Net."""


@dataclass
class RefineOptions:
    rounds: int = 5
    configuration: str = "3d_fullres"
    epochs: int = 250
    iterations: int = 250
    val_iterations: int = 50
    warm_start: bool = False
    warm_epochs: int = 50
    fold: str = "all"
    device: str = "auto"
    convergence: float = 0.99
    ignore: str = "rejected"
    # --sam2-from-nnunet (sslmedsam2.refine.sam2_refine): nnU-Net's key slices prompt SAM2, whose result is the next
    # pseudo-label; None: the defaults of propagate (model, image size) and of keyslices (key slices, continuity)
    sam2_from_nnunet: bool = False
    sam2_model: str | None = None
    sam2_checkpoint: str | None = None
    sam2_image_size: int | None = None
    sam2_download: bool = True
    key_slices: int | None = None
    min_continuity: float | None = None
    fusion: str = "sam2"
    # nnU-Net's prediction: test-time mirroring (up to 8 passes per tile in 3D) and the overlap of its tiles
    predict_mirroring: bool = True
    predict_step: float = 0.5
    # --gpus N|all: nnU-Net's multi-GPU (DDP) training and the round's predictions spread over this node's GPUs,
    # one process each; None: one device (--device)
    gpus: str | None = None

    @classmethod
    def quick(cls, **overrides) -> "RefineOptions":
        """A tiny schedule for CPU smoke runs: 2 epochs of 3 iterations (1 when warm-started), and a prediction
        without test-time mirroring and with tiles that do not overlap."""
        return cls(**{"epochs": 2, "iterations": 3, "val_iterations": 1, "warm_epochs": 1,
                      "predict_mirroring": False, "predict_step": 1.0, **overrides})

    def check(self) -> None:
        if self.configuration not in ("2d", "3d_fullres", "3d_lowres"):
            raise UserError(f"--configuration {self.configuration}: choose 2d, 3d_fullres or 3d_lowres")
        if self.ignore not in IGNORE_POLICIES:
            raise UserError(f"--ignore {self.ignore}: choose one of {', '.join(IGNORE_POLICIES)}")
        if min(self.rounds, self.epochs, self.iterations, self.val_iterations, self.warm_epochs) < 1:
            raise UserError("--rounds, --epochs, --iterations and --warm-epochs must be at least 1")
        if not 0 < self.convergence <= 1:
            raise UserError("--convergence must be in (0, 1]")
        if not 0 < self.predict_step <= 1:
            raise UserError("the prediction's tile step must be in (0, 1]")
        if self.fold != "all" and not (self.fold.isdigit() and int(self.fold) < NNUNET_FOLDS):
            raise UserError(f"--fold {self.fold}: a number 0-{NNUNET_FOLDS - 1}, or all")
        if self.sam2_from_nnunet:
            from sslmedsam2.refine.sam2_refine import check_options

            check_options(self)
        self.gpu_count()

    def gpu_count(self) -> int:
        """The GPUs --gpus asks for (0 without it); a one-line UserError when this machine cannot give them."""
        if self.gpus is None:
            return 0
        text = str(self.gpus)
        if text != "all" and not (text.isdigit() and int(text) >= 1):
            raise UserError(f"--gpus {text}: a number of GPUs (1 or more), or all")
        if self.device not in ("auto", "cuda"):
            raise UserError(f"--gpus trains on CUDA GPUs; it does not go with --device {self.device}")
        available = nnunet.visible_gpus()
        if available == 0:
            raise UserError("--gpus: this machine has no CUDA GPU that torch can use; leave --gpus out to train on "
                            "one device (--device)")
        if text != "all" and int(text) > available:
            raise UserError(f"--gpus {text}: this machine shows {available} GPU(s) (CUDA_VISIBLE_DEVICES="
                            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        return available if text == "all" else int(text)


class RefineJob:
    def __init__(self, ws: Workspace, options: RefineOptions, on_event: Callable[[dict], None] = lambda e: None) -> None:
        self.ws, self.options, self.on_event = ws, options, on_event
        self.dir = ws.refine_dir
        self.log = EventLog(self.dir)
        self.signalled: str | None = None  # the name of the stop signal received (SIGINT, SIGTERM)
        self._interruptible = False  # a stop signal unwinds the job at once (while it computes)
        self._shield = 0  # > 0 while the job records something (an event, the status): a signal waits for its end
        self.status: dict = {}
        self.gpus = 0  # --gpus, resolved when the job starts

    # --- files ---------------------------------------------------------------------------------------------------
    def round_dir(self, r: int) -> Path:
        return self.dir / "rounds" / f"round_{r:02d}"

    def _steps(self, r: int) -> dict:
        path = self.round_dir(r) / "steps.json"
        return json.loads(path.read_bytes()) if path.is_file() else {}

    def _mark(self, r: int, step: str) -> None:
        steps = {**self._steps(r), step: now()}
        self.round_dir(r).mkdir(parents=True, exist_ok=True)
        write_text(self.round_dir(r) / "steps.json", json.dumps(steps, indent=2))

    def round_result(self, r: int) -> dict | None:
        path = self.round_dir(r) / "round.json"
        return json.loads(path.read_bytes()) if path.is_file() else None

    def finished_rounds(self) -> list[dict]:
        return [result for result in map(self.round_result, range(self.options.rounds)) if result]

    # --- events --------------------------------------------------------------------------------------------------
    def emit(self, event: str, round_: int | None = None, **fields) -> None:
        """Status first, then the event: whoever sees an event finds the status at least as new."""
        with self._shielded():
            if event in ("stage", "job", "round", "error"):
                self.status.update(round=round_ if round_ is not None else self.status.get("round"),
                                   stage=fields.get("stage", self.status.get("stage")))
                self.log.write_status(self.status)
            self.on_event(self.log.emit(event, round_, **fields))

    @contextlib.contextmanager
    def _shielded(self) -> Iterator[None]:
        """A stop signal that arrives inside waits until the block has ended, then unwinds the job."""
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
        if self._shield == 0 and self.signalled and self._interruptible:
            self._interruptible = False
            raise _Stop()

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name
        if self._interruptible and self._shield == 0:
            self._interruptible = False  # once: the unwinding itself is not interrupted again
            raise _Stop()

    def _stopping(self) -> bool:
        """A stop request file (portable) or a stop signal since the job started."""
        return bool(self.signalled) or stop_requested(self.dir)

    def _check_stop(self) -> None:
        if self._stopping():
            raise Cancelled()

    # --- the job -------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        self.options.check()
        cases = list(self.ws.cases.values())
        if not any(c.has_label for c in cases):
            raise UserError(f"{self.ws.root}: no case has ground truth; nnU-Net needs at least one (workspace add --label)")
        if not any(not c.has_label for c in cases):
            raise UserError(f"{self.ws.root}: every case has ground truth; there is nothing to refine")
        if not self.ws.labels:
            raise UserError(f"{self.ws.root}: the workspace declares no labels")
        training = sum(c.has_label or c.has_pseudo for c in cases)  # round 0's; later rounds train on more
        if self.options.fold != "all" and training < NNUNET_FOLDS:
            raise UserError(f"--fold {self.options.fold}: nnU-Net's {NNUNET_FOLDS}-fold split needs at least "
                            f"{NNUNET_FOLDS} training cases (with ground truth or a pseudo-label), {self.ws.root} has "
                            f"{training}; use --fold all")

    def run(self) -> str:
        """Run or resume; returns the final state."""
        self.validate()
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = job_lock(self.dir)
        try:
            lock.acquire(timeout=LOCK_WAIT_S)
        except Timeout:
            pid = self.log.read_status().get("pid")
            raise UserError(f"a refine job is already running on {self.ws.root} (pid {pid})") from None
        clear_stop_request(self.dir)  # requests go to a running job only: one found now was for a job that died
        previous = {}
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    previous[number] = signal.signal(number, self._on_signal)
        # nnU-Net opens some pools with the platform default (fork); forking a process that runs threads (torch,
        # progress bars) can deadlock the children, so pools are spawned while the job runs
        start_method = multiprocessing.get_start_method(allow_none=True)
        multiprocessing.set_start_method("spawn", force=True)
        try:
            return self._run()
        finally:
            multiprocessing.set_start_method(start_method, force=True)
            for number, handler in previous.items():
                signal.signal(number, handler)
            clear_stop_request(self.dir)
            lock.release()

    def _run(self) -> str:
        o = self.options
        old = self.log.read_status()
        self.status = {"state": "running", "round": None, "stage": None, "pid": os.getpid(),
                       "started": old.get("started") if old.get("state") == "running" else now(),
                       "rounds": self.finished_rounds(),
                       "options": asdict(o), "message": ""}
        self.emit("job", state="running", message="resumed" if self._steps(0) else "started")
        folders = nnunet.use_folders(self.dir / "nnunet")
        from sslmedsam2.propagation.device import resolve_device

        self.gpus = o.gpu_count()
        device = "cuda" if self.gpus else str(resolve_device(o.device))
        state, message = "finished", ""
        try:
            self._interruptible = True
            if self.signalled:  # a signal before the handler could unwind anything
                raise _Stop()
            with open(self.dir / "nnunet.log", "a", encoding="utf-8") as nnunet_log, contextlib.redirect_stdout(nnunet_log):
                for r in range(o.rounds):
                    result = self.round_result(r) or self._round(r, folders, device)
                    if result["converged"]:
                        state = "converged"
                        break
        except (Cancelled, _Stop):
            state, message = "cancelled", self._cancel_message()
        except Exception as exc:  # the event log must say why the job ended, whatever the reason
            self._interruptible = False
            self.status.update(state="failed", message=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.emit("error", self.status.get("round"), message=self.status["message"])
            self.emit("job", self.status.get("round"), state="failed", message=self.status["message"])
            raise
        finally:
            self._interruptible = False
        self.status.update(state=state, message=message)
        self._plot()
        self.emit("job", self.status.get("round"), state=state, message=message)
        return state

    def _cancel_message(self) -> str:
        """Where the job stopped and why, and that running it again resumes."""
        why = f"stopped by {self.signalled}" if self.signalled else "stopped on request"
        where = (f" in round {self.status['round']} ({self.status.get('stage')})"
                 if self.status.get("round") is not None else "")
        return f"{why}{where}; run refine again to resume (finished steps and trained epochs are kept)"

    def _previous_pseudo(self, r: int) -> dict[str, Path]:
        if r == 0:
            return {c.id: self.ws.file(c.id, "pseudo") for c in self.ws.cases.values() if c.has_pseudo and not c.has_label}
        return {c.id: self.round_dir(r - 1) / "pseudo" / f"{c.id}.nii.gz" for c in self.ws.cases.values() if not c.has_label}

    def _round(self, r: int, folders: dict[str, Path], device: str) -> dict:
        o, steps = self.options, self._steps(r)
        previous = self._previous_pseudo(r)
        raw = folders["raw"] / nnunet.dataset_name(r)
        if "export" not in steps:
            self.emit("stage", r, stage="export", message=f"exporting round {r} to nnU-Net")
            shutil.rmtree(raw, ignore_errors=True)
            export_round(self.ws, raw, previous, o.ignore)
            self._mark(r, "export")
        self._check_stop()
        if "plan" not in steps:
            self.emit("stage", r, stage="plan", message="planning and preprocessing")
            shutil.rmtree(folders["preprocessed"] / nnunet.dataset_name(r), ignore_errors=True)
            nnunet.plan_and_preprocess(r, o.configuration, None if r == 0 else 0)
            self._mark(r, "plan")
        self._check_stop()
        warm = o.warm_start and r > 0
        self.emit("stage", r, stage="train", message="training" + (" (warm start)" if warm else ""))
        # one process per GPU: a stop signal must reach the ranks (at an epoch's end), not unwind this one alone
        with self._shielded() if self.gpus > 1 else contextlib.nullcontext():
            nnunet.train(r, o.configuration, o.fold, device, o.warm_epochs if warm else o.epochs, o.iterations,
                         o.val_iterations, on_epoch=lambda e: self.emit("epoch", r, **e), should_stop=self._stopping,
                         warm_start_from=(nnunet.model_folder(r - 1, o.configuration) / f"fold_{o.fold}"
                                          / "checkpoint_final.pth" if warm else None),
                         gpus=max(self.gpus, 1), log_path=self.dir / "nnunet.log")
        self._check_stop()
        unlabeled = sorted(c.id for c in self.ws.cases.values() if not c.has_label)
        predicted = self.round_dir(r) / "predicted"
        self.emit("stage", r, stage="predict", message=f"predicting {len(unlabeled)} cases")
        self._predict(r, unlabeled, predicted, device)
        sources = {}
        if o.sam2_from_nnunet:  # nnU-Net's key slices prompt SAM2; its result replaces the prediction
            from sslmedsam2.refine import sam2_refine

            self._check_stop()
            say = lambda message: self.emit("stage", r, stage="sam2", message=message)  # noqa: E731
            if "sam2" not in steps:
                say(f"SAM2 from nnU-Net's key slices: {len(unlabeled)} cases")
                sam2_refine.run_step(self.ws, unlabeled, predicted, self.round_dir(r) / "sam2",
                                     sam2_refine.settings_for(o, device, self.ws.channel, self.ws.axis, log=say),
                                     should_stop=self._stopping,
                                     on_case=lambda i, n, c: say(f"SAM2 from nnU-Net's key slices: case {i + 1}/{n} ({c})"))
                self._mark(r, "sam2")
            predicted = self.round_dir(r) / "sam2"
            sources = sam2_refine.round_sources(predicted, unlabeled)
        self.emit("stage", r, stage="score", message="comparing with the previous pseudo-labels")
        result = {**self._score(r, unlabeled, predicted, previous), **sources}
        self._overviews(r, unlabeled, previous, result)
        with self._shielded():
            write_text(self.round_dir(r) / "round.json", json.dumps(result, indent=2))
            self.status["rounds"] = [x for x in self.status["rounds"] if x["round"] != r] + [result]
        self.emit("round", r, **{k: v for k, v in result.items() if k != "round"})
        self._plot()
        return result

    def _predict(self, r: int, cases: list[str], predicted: Path, device: str) -> None:
        """nnU-Net's prediction of each case with its confidence table (one result: the label map appears last),
        one case at a time with an event each; finished cases are skipped."""
        from sslmedsam2.labelmap.confidence import pair_state

        o = self.options
        todo = [c for c in cases if pair_state(predicted / f"{c}.nii.gz") != "complete"]
        if not todo:
            return
        if self.gpus > 1:  # one process per GPU, each a shard of the cases; a stop signal reaches them between cases
            with self._shielded():
                nnunet.predict_on_gpus(self.gpus, r, o.configuration, o.fold, [self.ws.file(c, "image") for c in todo],
                                       [predicted / f"{c}.nii.gz" for c in todo], self._stopping, self.ws.axis,
                                       self.dir / "nnunet.log", mirroring=o.predict_mirroring, step=o.predict_step)
            return
        predictor = nnunet.load_predictor(r, o.configuration, o.fold, device)
        predictor.use_mirroring, predictor.tile_step_size = o.predict_mirroring, o.predict_step
        predicted.mkdir(parents=True, exist_ok=True)
        done = len(cases) - len(todo)
        for i, case_id in enumerate(todo, done + 1):
            self._check_stop()
            self.emit("case", r, stage="predict", case=case_id, index=i, cases=len(cases))
            nnunet.write_with_confidence(predictor, self.ws.file(case_id, "image"), predicted / f"{case_id}.nii.gz",
                                         self.ws.axis)

    def _score(self, r: int, cases: list[str], predicted: Path, previous: dict[str, Path]) -> dict:
        """New pseudo-label = prediction, except slices a person vouched for keep the workspace's pseudo-label.
        Scores: per case the mean Dice over labels against the previous pseudo-label and the held-out label; per
        label the mean over cases (cases where the label is in neither map do not count)."""
        labels = sorted(self.ws.labels.values())
        change, heldout = {}, {}
        label_change: dict[int, list[float]] = {}
        label_heldout: dict[int, list[float]] = {}
        (self.round_dir(r) / "pseudo").mkdir(parents=True, exist_ok=True)
        for case_id in cases:
            prediction = read_label_map(predicted / f"{case_id}.nii.gz")
            array = sitk.GetArrayFromImage(prediction)
            case = self.ws.cases[case_id]
            if case.has_pseudo:
                human = human_slices(self.ws.review(case_id))
                if human.any():
                    kept = sitk.GetArrayFromImage(read_label_map(self.ws.file(case_id, "pseudo")))
                    axis = slice_axis(prediction, self.ws.axis)
                    moved, source = np.moveaxis(array, axis, 0), np.moveaxis(kept, axis, 0)
                    moved[human[: moved.shape[0]]] = source[human[: moved.shape[0]]]
            new = sitk.GetImageFromArray(array)
            new.CopyInformation(prediction)
            write_image(new, self.round_dir(r) / "pseudo" / f"{case_id}.nii.gz")
            if case_id in previous and previous[case_id].is_file():
                before = sitk.GetArrayFromImage(read_label_map(previous[case_id]))
                change[case_id] = mean_dice(array, before, labels)
                _per_label(array, before, labels, label_change)
            if case.has_eval:
                truth = sitk.GetArrayFromImage(read_label_map(self.ws.file(case_id, "eval")))
                heldout[case_id] = mean_dice(array, truth, labels)
                _per_label(array, truth, labels, label_heldout)
        mean_change = float(np.mean(list(change.values()))) if change else None
        names = {v: n for n, v in self.ws.labels.items()}
        return {"round": r, "dice_change": change, "mean_dice_change": mean_change,
                "label_change": {names[v]: float(np.mean(d)) for v, d in sorted(label_change.items())},
                "heldout": heldout, "heldout_dice": float(np.mean(list(heldout.values()))) if heldout else None,
                "label_heldout": {names[v]: float(np.mean(d)) for v, d in sorted(label_heldout.items())},
                "converged": mean_change is not None and mean_change >= self.options.convergence}

    def _overviews(self, r: int, cases: list[str], previous: dict[str, Path], result: dict) -> None:
        """rounds/round_NN/overview/<case>.png: the new pseudo-label in colour over slices across the structure,
        outlined in white by the held-out label, else by the previous pseudo-label."""
        from sslmedsam2.refine.plot import draw_case_overview

        folder = self.round_dir(r) / "overview"
        folder.mkdir(parents=True, exist_ok=True)
        for case_id in cases:
            has_eval = self.ws.cases[case_id].has_eval
            outline = self.ws.file(case_id, "eval") if has_eval else previous.get(case_id)
            draw_case_overview(self.ws, case_id, self.round_dir(r) / "pseudo" / f"{case_id}.nii.gz",
                               outline if outline is not None and outline.is_file() else None,
                               "held-out label" if has_eval else "previous pseudo-label", r, result,
                               folder / f"{case_id}.png")

    def _plot(self) -> None:
        from sslmedsam2.refine.plot import plot_rounds

        with self._shielded():
            plot_rounds(self.finished_rounds(), self.dir / "progress.png", self.options.convergence, self.status)


def _per_label(a: np.ndarray, b: np.ndarray, labels: list[int], into: dict[int, list[float]]) -> None:
    """Each label's Dice between two maps, where it is in either, appended to `into[label]`."""
    for label in labels:
        x, y = a == label, b == label
        if x.any() or y.any():
            into.setdefault(label, []).append(dice(x, y))


def current_outputs(ws: Workspace, status: dict | None = None) -> dict:
    """Where a user finds the results: the current pseudo-labels (the last finished round's, else the
    workspace's own), the current model (the last round with a final checkpoint: what `predict` uses), the last
    round's folder and the progress plot; paths as strings, None where there is none yet."""
    status = refine_status(ws) if status is None else status
    finished = sorted(r["round"] for r in status.get("rounds", []) if isinstance(r, dict) and "round" in r)
    out: dict = {"pseudo_labels": None, "pseudo_labels_from": "workspace", "model": None, "last_round": None,
                 "overviews": None, "progress_plot": None}
    if finished:
        last = ws.refine_dir / "rounds" / f"round_{finished[-1]:02d}"
        out.update(pseudo_labels=str(last / "pseudo"), pseudo_labels_from=f"round {finished[-1]}",
                   last_round=str(last), overviews=str(last / "overview") if (last / "overview").is_dir() else None)
        options = status.get("options") or {}
        if options.get("configuration") and options.get("fold"):
            nnunet.use_folders(ws.refine_dir / "nnunet", create=False)
            for r in reversed(finished):
                checkpoint = (nnunet.model_folder(r, options["configuration"]) / f"fold_{options['fold']}"
                              / "checkpoint_final.pth")
                if checkpoint.is_file():
                    out["model"] = {"round": r, "configuration": options["configuration"], "fold": options["fold"],
                                    "checkpoint": str(checkpoint)}
                    break
    elif any(c.has_pseudo for c in ws.cases.values()):
        out["pseudo_labels"] = str(ws.root / "cases" / "<id>" / "pseudo.nii.gz")
    if (ws.refine_dir / "progress.png").is_file():
        out["progress_plot"] = str(ws.refine_dir / "progress.png")
    return out


def refined_pseudo(ws: Workspace, case_id: str) -> tuple[Path, Path | None] | None:
    """The last finished round's pseudo-label of a case and the confidence table of the prediction it came from
    (nnU-Net's, or SAM2's with --sam2-from-nnunet); None before a round has finished."""
    rounds = sorted((ws.refine_dir / "rounds").glob("round_*/round.json"))
    for record in reversed(rounds):
        folder = record.parent
        pseudo = folder / "pseudo" / f"{case_id}.nii.gz"
        if pseudo.is_file():
            tables = [folder / source / f"{case_id}.confidence.csv" for source in ("sam2", "predicted")]
            return pseudo, next((t for t in tables if t.is_file()), None)
    return None


def refine_status(ws: Workspace) -> dict:
    """The job's status for `workspace status`: "running" without a job holding the lock (crashed, killed) shows as
    failed."""
    log = EventLog(ws.refine_dir)
    status = log.read_status()
    if status.get("state") == "running" and not job_running(ws.refine_dir):
        status = log.read_status()  # it may have finished between the two looks
        if status.get("state") == "running":
            status = {**status, "state": "failed",
                      "message": "the job stopped without saying so (killed?); run refine again to resume"}
    return status
