"""File in, file out: an image and a few drawn slices -> a full label map and its confidence table, through an
engine session in this process or on a server (`--server`), or by contour interpolation. `sslmedsam2 propagate`
and the demo run this; everything that can be checked is checked before the long work, nothing is written unless
all of it succeeds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sslmedsam2.errors import UserError
from sslmedsam2.jobs import Progress
from sslmedsam2.labelmap.confidence import confidence_path, write_result
from sslmedsam2.labelmap.seeds import Seeds
from sslmedsam2.models.cache import find_weights
from sslmedsam2.session.prompts import check_seed_map, planes_of
from sslmedsam2.settings import EngineSettings
from sslmedsam2.volume import check_same_grid, read_image, read_label_map
from sslmedsam2.volume.io import check_geometry_fits, check_output, check_table_output
from sslmedsam2.volume.slices import SliceVolume


@dataclass
class PropagateReport:
    method: str
    output: Path
    confidence: Path
    labels: list[int]
    slices: int
    seconds: float
    model: str | None = None
    device: str | None = None


@dataclass
class Inputs:
    """An image and its seeds, read and checked: the image as slices (8-bit frames when SAM2 runs here) and the
    float image (kept only when it is sent to a server as a converted file)."""

    volume: SliceVolume
    seeds: Seeds  # slice-first, on the volume's slices
    image: object = None


def read_inputs(image_path: Path, seeds_path: Path, settings: EngineSettings, seed_slices: list[int] | None = None,
                log: Callable[[str], None] = print, allow_uneven: bool = False) -> Inputs:
    """Read IMAGE and SEEDS, check them (grid, drawing), cut them into slices along the settings' axis (the 8-bit
    frames are made when SAM2 runs here)."""
    image = read_image(image_path, allow_uneven)
    seeds_image = read_label_map(seeds_path)
    check_same_grid(image, seeds_image, what=f"seed label map {Path(seeds_path).name}")
    volume = SliceVolume.from_image(image, settings.axis, None, Path(image_path).name, labels=seeds_image,
                                    path=Path(image_path))
    seeds, volume.labels = volume.labels, None
    checked = check_seed_map(seeds, str(seeds_path))
    if seed_slices is not None:
        outside = [z for z in seed_slices if not 0 <= z < seeds.shape[0]]
        if outside:
            raise UserError(f"--seed-slices {outside}: outside 0..{seeds.shape[0] - 1}")
        labelled = sorted({z for zs in checked.seed_slices().values() for z in zs})
        empty = [z for z in seed_slices if z not in labelled]
        if len(empty) == len(seed_slices):
            raise UserError(f"--seed-slices: none of slices {empty} carries a label in {Path(seeds_path).name}; "
                            f"its labelled slices are {labelled}")
        if empty:
            log(f"--seed-slices: slices {empty} carry no label and are not prompts")
        keep = np.zeros(seeds.shape[0], bool)
        keep[list(seed_slices)] = True
        checked = Seeds(np.where(keep[:, None, None], seeds, 0))
    return Inputs(volume, checked, image)


def _check_remote(settings: EngineSettings) -> None:
    if settings.method == "interpolate":
        raise UserError("--method interpolate runs on this machine; leave out --server")
    if settings.checkpoint is not None:
        raise UserError("--checkpoint names a file on this machine; a server uses its own weights "
                        "(sslmedsam2 serve --checkpoint), so leave out --checkpoint with --server")
    if settings.compile:
        raise UserError("--compile is the server's setting (sslmedsam2 serve --compile); leave it out with --server")


def run_propagate(image_path: Path, seeds_path: Path, output: Path, settings: EngineSettings,
                  log: Callable[[str], None] = print, progress: Progress | None = None, download_progress=False,
                  overwrite: bool = False, seed_slices: list[int] | None = None, allow_uneven: bool = False,
                  server: str | None = None, token_file: Path | None = None) -> PropagateReport:
    """`sslmedsam2 propagate`: SAM2 in this process, on `server`, or contour interpolation (method interpolate, or
    auto without weights). Existing outputs not written by this tool are replaced only with `overwrite`."""
    if server is not None:
        _check_remote(settings)
    settings.check()
    if server is None and settings.method == "interpolate":
        from sslmedsam2.interpolation.contour import WORKER

        WORKER.start()  # ITK loads (seconds) while the inputs are read and checked
    output, inputs = Path(output), (Path(image_path), Path(seeds_path))
    check_output(output, inputs, overwrite)
    confidence = confidence_path(output)
    check_table_output(confidence, inputs, overwrite)
    started = time.perf_counter()
    case = read_inputs(*inputs, settings, seed_slices, log, allow_uneven)
    check_geometry_fits(case.image, output, what=str(image_path))
    weights = None
    if server is None and settings.method != "interpolate":
        weights = find_weights(settings.model, settings.checkpoint, settings.download, settings.method == "sam2",
                               log, download_progress)
    model = device = None
    if server is not None:
        labels, rows, model, device = _on_server(case, settings, server, token_file, log, progress)
    elif weights is None:
        from sslmedsam2.interpolation.contour import interpolate_between_seeds

        done = interpolate_between_seeds(case.seeds)
        labels, rows = done.labels, done.confidence
    else:
        labels, rows, model, device = _here(case, settings, weights, log, progress)
    write_result(case.volume.to_image(labels), output, rows)
    method = "interpolate" if server is None and weights is None else "sam2"
    return PropagateReport(method, output, confidence, case.seeds.labels, case.volume.shape[0],
                           time.perf_counter() - started, model, device)


def _here(case: Inputs, settings: EngineSettings, weights: Path, log, progress):
    from sslmedsam2.propagation.builder import build_predictor
    from sslmedsam2.propagation.device import resolve_device
    from sslmedsam2.session.local import LocalSession

    device = resolve_device(settings.device)
    predictor = build_predictor(settings.spec, weights, device, settings.image_size, settings.compile, log)
    case.volume.make_frames(case.image, settings.intensity)
    case.image = None  # the float image is not needed any more: its slices are the frames
    session = LocalSession(case.volume, predictor)
    result = session.propagate(planes_of(case.seeds.labels_map), progress=progress)
    return result.labels, result.confidence, settings.spec.name, str(device)


def _on_server(case: Inputs, settings: EngineSettings, server: str, token_file: Path | None, log, progress):
    from sslmedsam2.remote.client import Client
    from sslmedsam2.session.remote import RemoteSession, image_payload

    client = Client(server, token_file=token_file)
    try:
        client.compatible_health()  # before any other request: a server of another API answers them otherwise
        info = client.info()
        if settings.device not in (None, "auto"):
            log(f"--device {settings.device} is ignored with --server: the server computes on its {info['device']}")
        data, name = image_payload(case.volume.path, case.image)
        with RemoteSession.for_settings(client, data, name, settings) as session:
            if session.shape != case.volume.shape:
                raise UserError(f"the server cut the volume into {session.shape} slices, this machine into "
                                f"{case.volume.shape}; is the server's sslmedsam2 version {info['version']} compatible?")
            result = session.propagate(planes_of(case.seeds.labels_map), progress=progress)
        for note in result.notes:
            log(note)
        return result.labels, result.confidence, session.info["model"], f"{info['device']} at {client.url}"
    finally:
        client.close()
