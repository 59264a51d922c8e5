"""nnU-Net v2 through its Python API: planning, preprocessing, training with progress events, prediction.

The command-line trainer lookup imports modules that need torchvision, so the trainer is built directly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sslmedsam2.jobs import Cancelled
from sslmedsam2.refine import checkpoints

DATASET_BASE_ID = 500  # round r is nnU-Net dataset 500 + r, inside the workspace's own nnU-Net folders
TRAINER = checkpoints.TRAINER
PLANS = "nnUNetPlans"


def use_folders(root: Path, create: bool = True) -> dict[str, Path]:
    """Point nnU-Net at the workspace's folders (its paths are read from the environment when used).
    `create=False` for readers (predict), which must not write into a workspace."""
    folders = {name: root / name for name in ("raw", "preprocessed", "results")}
    for path in folders.values():
        if create:
            path.mkdir(parents=True, exist_ok=True)
    os.environ.update(nnUNet_raw=str(folders["raw"]), nnUNet_preprocessed=str(folders["preprocessed"]),
                      nnUNet_results=str(folders["results"]))
    os.environ.setdefault("nnUNet_compile", "f")  # torch.compile costs minutes up front and is fragile on CPU
    return folders


def dataset_name(round_: int) -> str:
    return f"Dataset{DATASET_BASE_ID + round_:03d}_SSLMedSAM2r{round_:02d}"


def plan_and_preprocess(round_: int, configuration: str, reuse_plans_of: int | None = None) -> None:
    """Round 0 fingerprints and plans; later rounds reuse its plans (same images, same network) and only preprocess."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    from nnunetv2.paths import nnUNet_preprocessed

    dataset_id = DATASET_BASE_ID + round_
    os.environ["nnUNet_n_proc_DA"] = "1"  # planning calls torch.set_num_threads with it
    if reuse_plans_of is None:
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, show_progress_bar=False)
        plan_experiments([dataset_id])
    else:
        source, target = Path(nnUNet_preprocessed) / dataset_name(reuse_plans_of), Path(nnUNet_preprocessed) / dataset_name(round_)
        target.mkdir(parents=True, exist_ok=True)
        plans = json.loads((source / f"{PLANS}.json").read_bytes())
        checkpoints.check_plans(plans, configuration, source / f"{PLANS}.json", remedy(reuse_plans_of, configuration))
        plans["dataset_name"] = dataset_name(round_)
        (target / f"{PLANS}.json").write_text(json.dumps(plans, indent=2))
        shutil.copyfile(source / "dataset_fingerprint.json", target / "dataset_fingerprint.json")
        shutil.copyfile(Path(os.environ["nnUNet_raw"]) / dataset_name(round_) / "dataset.json", target / "dataset.json")
    preprocess([dataset_id], PLANS, configurations=(configuration,), num_processes=(1,), show_progress_bar=False)


def model_folder(round_: int, configuration: str) -> Path:
    from nnunetv2.paths import nnUNet_results

    return Path(nnUNet_results) / dataset_name(round_) / f"{TRAINER}__{PLANS}__{configuration}"


def manifest_path() -> Path:
    """WS/refine/checkpoints.sha256: the digests of the checkpoints (and their plans and dataset files) that refine
    wrote (use_folders(WS/refine/nnunet) points nnU-Net's results at WS/refine/nnunet/results)."""
    from nnunetv2.paths import nnUNet_results

    return Path(nnUNet_results).parent.parent / checkpoints.MANIFEST


def remedy(round_: int, configuration: str) -> str:
    """What to do about a refused file of round `round_`: train that round again."""
    refine = manifest_path().parent
    return (f"Delete {model_folder(round_, configuration)} and {refine / 'rounds' / f'round_{round_:02d}'}, then run "
            f"`sslmedsam2 refine {refine.parent}` again.")


def _bare_network(trainer):
    """The trainer's network without its DistributedDataParallel and torch.compile wrappers (as nnU-Net's own
    save and load do)."""
    from torch._dynamo import OptimizedModule

    network = trainer.network.module if trainer.is_ddp else trainer.network
    return network._orig_mod if isinstance(network, OptimizedModule) else network


def _load_weights(trainer, weights: dict) -> None:
    """nnU-Net's key heuristic: a state dict saved from nn.DataParallel has `module.` prefixes."""
    network = _bare_network(trainer)
    own = network.state_dict().keys()
    network.load_state_dict({k[7:] if k not in own and k.startswith("module.") else k: v for k, v in weights.items()})


def _trainer_class(configuration: str, fix: str, on_epoch: Callable[[dict], None], should_stop: Callable[[], bool]):
    """nnU-Net's own trainer, reporting each epoch, stopping cleanly when asked (all ranks together under DDP),
    and saving and loading its checkpoints only through sslmedsam2.refine.checkpoints."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    manifest = manifest_path()

    class ReportingTrainer(nnUNetTrainer):
        def on_epoch_end(self) -> None:
            super().on_epoch_end()  # logs the epoch's end, saves checkpoint_latest (save_every = 1), counts the epoch
            log = self.logger.get_value
            seconds = float(log("epoch_end_timestamps", step=-1) - log("epoch_start_timestamps", step=-1))
            if self.local_rank == 0:
                on_epoch({"epoch": self.current_epoch, "epochs": self.num_epochs,
                          "loss": float(log("train_losses", step=-1)), "val_loss": float(log("val_losses", step=-1)),
                          "pseudo_dice": [float(v) for v in log("dice_per_class_or_region", step=-1)],
                          "eta_s": round(seconds * (self.num_epochs - self.current_epoch), 1)})
            stop = should_stop()
            if self.is_ddp:  # every rank must stop at the same epoch, or the others wait for it forever
                import torch
                import torch.distributed as dist

                flag = torch.tensor([int(stop)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop and self.current_epoch < self.num_epochs:
                raise Cancelled()  # the checkpoint of this epoch is already saved

        def save_checkpoint(self, filename: str) -> None:
            if self.local_rank != 0 or self.disable_checkpointing:
                return super().save_checkpoint(filename)
            base = Path(self.output_folder_base)  # on_train_start copied plans.json and dataset.json there
            companions = [p for p in (base / "plans.json", base / "dataset.json") if p.is_file()]
            checkpoints.save_recorded(lambda tmp: nnUNetTrainer.save_checkpoint(self, str(tmp)), Path(filename),
                                      manifest, companions)

        def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
            """nnU-Net's, but a path goes through the safe loader (nnU-Net 2.8.1's own is broken for a dict)."""
            checkpoint = filename_or_checkpoint
            if not isinstance(checkpoint, dict):
                checkpoint = checkpoints.load_checkpoint(Path(checkpoint), manifest, fix, map_location=self.device)
                checkpoints.check_trainer(checkpoint, configuration, Path(filename_or_checkpoint), fix)
            if not self.was_initialized:
                self.initialize()
            _load_weights(self, checkpoint["network_weights"])
            self.my_init_kwargs = checkpoint["init_args"]
            self.current_epoch = checkpoint["current_epoch"]
            self.logger.load_checkpoint(checkpoint["logging"])
            self._best_ema = checkpoint["_best_ema"]
            self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                                   self.inference_allowed_mirroring_axes)
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
            if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
                self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    ReportingTrainer.__name__ = ReportingTrainer.__qualname__ = TRAINER  # nnU-Net's standard folder and name
    return ReportingTrainer


def _prepared_trainer(round_: int, configuration: str, fold: str, device, epochs: int, iterations: int,
                      val_iterations: int, on_epoch: Callable[[dict], None], should_stop: Callable[[], bool],
                      warm_start_from: Path | None = None):
    """The trainer of this round, with its schedule, resumed from nnU-Net's latest checkpoint or warm-started;
    None when the round's final checkpoint exists. Every file is checked before nnU-Net builds anything."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed

    manifest, fix = manifest_path(), remedy(round_, configuration)
    preprocessed = Path(nnUNet_preprocessed) / dataset_name(round_)
    plans = json.loads((preprocessed / f"{PLANS}.json").read_bytes())
    checkpoints.check_plans(plans, configuration, preprocessed / f"{PLANS}.json", fix)
    output = model_folder(round_, configuration) / f"fold_{fold}"
    latest, final = output / "checkpoint_latest.pth", output / "checkpoint_final.pth"
    if final.is_file():
        return None
    resume = warm = None  # checked before nnU-Net builds anything
    if latest.is_file():
        resume = checkpoints.load_checkpoint(latest, manifest, fix, map_location=torch.device(device))
        checkpoints.check_trainer(resume, configuration, latest, fix)
    elif warm_start_from is not None:
        previous = remedy(round_ - 1, configuration)  # the round that wrote it
        warm = checkpoints.load_checkpoint(warm_start_from, manifest, previous, map_location=torch.device(device))
        checkpoints.check_trainer(warm, configuration, warm_start_from, previous)
        warm = warm["network_weights"]
    plans["continue_training"] = resume is not None
    trainer = _trainer_class(configuration, fix, on_epoch, should_stop)(
        plans, configuration, fold if fold == "all" else int(fold),
        json.loads((preprocessed / "dataset.json").read_bytes()), torch.device(device))
    trainer.num_epochs, trainer.num_iterations_per_epoch = epochs, iterations
    trainer.num_val_iterations_per_epoch, trainer.save_every = val_iterations, 1
    if resume is not None:
        trainer.load_checkpoint(resume)
    elif warm is not None:
        trainer.initialize()
        _load_weights(trainer, warm)
    return trainer


def train(round_: int, configuration: str, fold: str, device, epochs: int, iterations: int, val_iterations: int,
          on_epoch: Callable[[dict], None], should_stop: Callable[[], bool], warm_start_from: Path | None = None,
          gpus: int = 1, log_path: Path | None = None) -> Path:
    """Train (or continue an interrupted training from nnU-Net's own latest checkpoint); returns the final checkpoint.

    Every checkpoint it saves is published atomically with its digest in `manifest_path()`; the latest checkpoint
    and the warm start are loaded only through `checkpoints.load_checkpoint` (digest, then weights-only).
    `gpus` > 1: nnU-Net's own DistributedDataParallel training on that many CUDA devices of this node, one process
    each (refine.gpus; their nnU-Net output goes to `log_path`)."""
    if str(device) == "cpu":
        os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in this process: no worker processes to orphan
    else:
        os.environ.pop("nnUNet_n_proc_DA", None)  # nnU-Net's own choice of augmentation workers
    final = model_folder(round_, configuration) / f"fold_{fold}" / "checkpoint_final.pth"
    if gpus > 1:
        if not final.is_file():
            train_ddp(gpus, {"round": round_, "configuration": configuration, "fold": fold, "epochs": epochs,
                             "iterations": iterations, "val_iterations": val_iterations,
                             "warm_start_from": str(warm_start_from) if warm_start_from else None,
                             "log": str(log_path) if log_path else None}, on_epoch, should_stop)
    else:
        trainer = _prepared_trainer(round_, configuration, fold, device, epochs, iterations, val_iterations, on_epoch,
                                    should_stop, warm_start_from)
        if trainer is not None:
            trainer.run_training()
    checkpoints.forget_missing(manifest_path())  # nnU-Net deleted checkpoint_latest.pth after saving the final one
    return final


def load_predictor(round_: int, configuration: str, fold: str, device, progress: bool = False):
    """nnU-Net's predictor with the round's trained weights (sliding-window progress bars on stderr if asked).

    Built by hand (`manual_initialization`) from files checked by sslmedsam2.refine.checkpoints: plans.json,
    dataset.json and the final checkpoint by their recorded digests, the checkpoint weights-only, the classes
    plans.json names against the allow-list; nnU-Net's own loader would unpickle anything."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder, manifest, fix = model_folder(round_, configuration), manifest_path(), remedy(round_, configuration)
    path = folder / f"fold_{fold}" / "checkpoint_final.pth"
    plans = checkpoints.load_json(folder / "plans.json", manifest, fix)
    dataset_json = checkpoints.load_json(folder / "dataset.json", manifest, fix)
    checkpoints.check_plans(plans, configuration, folder / "plans.json", fix)
    checkpoint = checkpoints.load_checkpoint(path, manifest, fix, map_location=torch.device("cpu"))
    checkpoints.check_trainer(checkpoint, configuration, path, fix)
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration_manager, determine_num_input_channels(plans_manager, configuration_manager,
                                                                           dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    weights = checkpoint["network_weights"]
    network.load_state_dict(weights)
    predictor = nnUNetPredictor(device=torch.device(device), allow_tqdm=progress,
                                perform_everything_on_device=str(device) != "cpu")
    predictor.manual_initialization(network, plans_manager, configuration_manager, [weights], dataset_json, TRAINER,
                                    checkpoint.get("inference_allowed_mirroring_axes"))
    return predictor


def predict_probabilities(predictor, image: Path):
    """(label map, {label value: softmax channel}) of one image, both in SimpleITK's array order (z, y, x) on the
    image's own grid, from nnU-Net's sequential path (no worker pool, nothing written)."""
    import numpy as np

    [(segmentation, probabilities)] = predictor.predict_from_files_sequential([[str(image)]], None, True, True, None)
    channels = predictor.label_manager.all_labels  # softmax channel i is label all_labels[i]
    return (np.asarray(segmentation),
            {int(v): np.asarray(probabilities[i], dtype=np.float32) for i, v in enumerate(channels) if v != 0})


def predict(round_: int, configuration: str, fold: str, device, images: list[Path], outputs: list[Path],
            should_stop: Callable[[], bool] = lambda: False, confidence_axis: str | None = None,
            mirroring: bool | None = None, step: float | None = None) -> None:
    """Predict one image at a time (nnU-Net's sequential path: no worker pool), skipping finished outputs.

    confidence_axis: also write each output's `.confidence.csv` from nnU-Net's softmax along this slice axis
    (before the label map, which appears last; an output without its table is predicted again). mirroring, step:
    nnU-Net's test-time mirroring and tile step (None: nnU-Net's defaults)."""
    from sslmedsam2.labelmap.confidence import pair_state

    todo = [(i, o) for i, o in zip(images, outputs)
            if not o.exists() or (confidence_axis is not None and pair_state(o) != "complete")]
    if not todo:
        return
    predictor = load_predictor(round_, configuration, fold, device)
    if mirroring is not None:
        predictor.use_mirroring = mirroring
    if step is not None:
        predictor.tile_step_size = step
    for image, output in todo:
        if should_stop():
            raise Cancelled()
        output.parent.mkdir(parents=True, exist_ok=True)
        if confidence_axis is not None:
            write_with_confidence(predictor, image, output, confidence_axis)
            continue
        truncated = output.parent / f".{output.name[: -len('.nii.gz')]}.tmp{int(time.time() * 1e6)}"
        predictor.predict_from_files_sequential([[str(image)]], [str(truncated)], False, True, None)
        os.replace(f"{truncated}.nii.gz", output)


def write_with_confidence(predictor, image: Path, output: Path, axis: str, reference=None):
    """Predict `image`; write its confidence table (slices along `axis`), then the label map `output` (atomic,
    verified, on the grid of `reference`, default: the image file's); returns the pair's result id and the label
    map (a SimpleITK image)."""
    import numpy as np
    import SimpleITK as sitk

    from sslmedsam2.labelmap.confidence import write_result
    from sslmedsam2.refine.softmax import softmax_confidence
    from sslmedsam2.volume import slice_axis

    segmentation, probabilities = predict_probabilities(predictor, image)
    reference = sitk.ReadImage(str(image)) if reference is None else reference
    labels = sitk.GetImageFromArray(segmentation.astype(np.uint8 if segmentation.max() < 256 else np.uint16))
    labels.CopyInformation(reference)
    array_axis = slice_axis(reference, axis)
    rows = softmax_confidence(np.moveaxis(segmentation, array_axis, 0),
                              {k: np.moveaxis(v, array_axis, 0) for k, v in probabilities.items()})
    return write_result(labels, output, rows), labels  # the table, then the label map


# --- the GPUs of one node (refine --gpus) ----------------------------------------------------------------------
def visible_gpus() -> int:
    """The CUDA devices torch sees in this process (after CUDA_VISIBLE_DEVICES); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_environments(count: int, visible: str | None = None) -> list[dict[str, str]]:
    """CUDA_VISIBLE_DEVICES for one process per GPU: the g-th device this process sees, so that a scheduler's own
    CUDA_VISIBLE_DEVICES (SLURM sets e.g. '2,5' for two GPUs of a shared node) is honoured."""
    from sslmedsam2.errors import UserError

    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    devices = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(g) for g in range(count)]
    if len(devices) < count:
        raise UserError(f"--gpus {count}: CUDA_VISIBLE_DEVICES={visible} shows only {len(devices)} GPU(s)")
    return [{"CUDA_VISIBLE_DEVICES": devices[g]} for g in range(count)]


def _last_line(text: str) -> str:
    """A child's traceback reduced to its last line, without the exception's module path for ours."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "no message"
    for prefix in ("sslmedsam2.errors.UserError: ", "UserError: ", "error: "):
        line = line.removeprefix(prefix)
    return line[:300]


def train_ddp(gpus: int, job: dict, on_epoch: Callable[[dict], None], should_stop: Callable[[], bool]) -> None:
    """nnU-Net's DistributedDataParallel training as its run_training(num_gpus=N) runs it: one spawned process per
    GPU (rank = device index), NCCL over localhost. Rank 0 reports each epoch through a queue; a stop request
    reaches every rank through an event and the ranks agree at an epoch's end (_trainer_class), so all stop at
    the same epoch with its checkpoint saved. Unmeasured: written for nnU-Net 2.8's trainer, never run on GPUs here."""
    import torch.multiprocessing as mp
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.run.run_training import find_free_network_port

    from sslmedsam2.errors import UserError

    plans = json.loads((Path(nnUNet_preprocessed) / dataset_name(job["round"]) / f"{PLANS}.json").read_bytes())
    batch = (plans.get("configurations", {}).get(job["configuration"]) or {}).get("batch_size")
    if isinstance(batch, int) and batch < gpus:
        raise UserError(f"--gpus {gpus}: nnU-Net splits its batch of {batch} over the GPUs, at least one sample "
                        f"each; use --gpus {batch} or fewer for {job['configuration']}")
    os.environ["MASTER_ADDR"] = "localhost"
    os.environ.setdefault("MASTER_PORT", str(find_free_network_port()))
    context = mp.get_context("spawn")
    events, stop = context.SimpleQueue(), context.Event()
    processes = mp.start_processes(_ddp_worker, args=(gpus, job, events, stop), nprocs=gpus, join=False,
                                   start_method="spawn")
    cancelled = False

    def drain() -> None:
        nonlocal cancelled
        while not events.empty():
            event = events.get()
            if event.get("cancelled"):
                cancelled = True
            else:
                on_epoch(event)

    try:
        while not processes.join(timeout=1.0):
            drain()
            if should_stop():
                stop.set()
    except mp.ProcessRaisedException as exc:
        raise UserError(f"nnU-Net's training on {gpus} GPUs failed: {_last_line(str(exc))}") from None
    except mp.ProcessExitedException as exc:
        raise UserError(f"nnU-Net's training on {gpus} GPUs failed: process {exc.error_index} ended "
                        f"({exc.signal_name or f'exit code {exc.exit_code}'})") from None
    finally:
        for process in processes.processes:
            if process.is_alive():
                process.terminate()
    drain()
    if cancelled:
        raise Cancelled()


def _ddp_worker(rank: int, world: int, job: dict, events, stop) -> None:
    """One rank of train_ddp, in its own spawned process: it builds its trainer itself from `job`."""
    import contextlib

    import torch
    import torch.distributed as dist

    sink = open(job["log"], "a", encoding="utf-8") if rank == 0 and job.get("log") else open(os.devnull, "w")
    with sink, contextlib.redirect_stdout(sink):
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world)
        try:
            trainer = _prepared_trainer(job["round"], job["configuration"], job["fold"], f"cuda:{rank}", job["epochs"],
                                        job["iterations"], job["val_iterations"],
                                        events.put if rank == 0 else (lambda event: None), stop.is_set,
                                        Path(job["warm_start_from"]) if job["warm_start_from"] else None)
            if trainer is not None:
                trainer.run_training()
        except Cancelled:
            if rank == 0:
                events.put({"cancelled": True})
        finally:
            dist.destroy_process_group()


def predict_on_gpus(gpus: int, round_: int, configuration: str, fold: str, images: list[Path], outputs: list[Path],
                    should_stop: Callable[[], bool] = lambda: False, confidence_axis: str | None = None,
                    log_path: Path | None = None, device: str = "cuda", mirroring: bool | None = None,
                    step: float | None = None) -> None:
    """`predict` spread over `gpus` GPUs of this node: one process per GPU (CUDA_VISIBLE_DEVICES set to it), each
    a shard of the cases (sslmedsam2.cohort.shards) with the model loaded once, skipping finished outputs. A stop
    request reaches them as SIGTERM: each stops after its case under way. `device`: what the processes run on
    ("cuda"; the tests run the same path on "cpu")."""
    from sslmedsam2.cohort.shards import shard_of
    from sslmedsam2.errors import UserError

    target = dict(zip(images, outputs))
    environments = gpu_environments(gpus) if device == "cuda" else [{} for _ in range(gpus)]
    running: list[tuple[int, subprocess.Popen, object]] = []
    try:
        for g, environment in enumerate(environments):
            mine = shard_of(images, (g + 1, gpus))
            if not mine:
                continue
            spec = {"round": round_, "configuration": configuration, "fold": fold, "device": device,
                    "images": [str(p) for p in mine], "outputs": [str(target[p]) for p in mine],
                    "confidence_axis": confidence_axis, "mirroring": mirroring, "step": step}
            errors = tempfile.TemporaryFile()
            out = open(log_path, "ab") if log_path else subprocess.DEVNULL
            try:
                process = subprocess.Popen([sys.executable, "-m", "sslmedsam2.refine.nnunet", json.dumps(spec)],
                                           env={**os.environ, **environment}, stdout=out, stderr=errors)
            finally:
                if log_path:
                    out.close()
            running.append((g, process, errors))
        stopping = False
        while any(p.poll() is None for _, p, _ in running):
            if not stopping and should_stop():
                stopping = True
                for _, process, _ in running:
                    if process.poll() is None:
                        process.terminate()  # SIGTERM: the process stops after its case under way
            time.sleep(0.2)
        for g, process, errors in running:
            if process.returncode not in (0, 3):
                errors.seek(0)
                raise UserError(f"prediction on GPU {g} failed: {_last_line(errors.read().decode(errors='replace'))}")
        if stopping or any(process.returncode == 3 for _, process, _ in running):
            raise Cancelled()
    finally:
        for _, process, errors in running:
            if process.poll() is None:
                process.kill()
                process.wait()
            errors.close()


def _predict_shard(argv: list[str]) -> int:
    """`python -m sslmedsam2.refine.nnunet SPEC`: one process of predict_on_gpus. Exit code 0 done, 3 stopped
    (SIGTERM, after the case under way), 1 a one-line error on stderr."""
    from sslmedsam2.jobs import failure_line

    spec = json.loads(argv[0])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        predict(spec["round"], spec["configuration"], spec["fold"], spec["device"], [Path(p) for p in spec["images"]],
                [Path(p) for p in spec["outputs"]], should_stop=stop.is_set, confidence_axis=spec["confidence_axis"],
                mirroring=spec.get("mirroring"), step=spec.get("step"))
    except Cancelled:
        return 3
    except Exception as exc:
        line = failure_line(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_predict_shard(sys.argv[1:]))
