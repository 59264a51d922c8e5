"""`sslmedsam2 propagate ... --server URL`: the same command, its checks and its outputs, with the SAM2 work done by
a server (a GPU elsewhere). Inputs are read and checked here by the engine's own functions before anything is sent;
the outputs are written here by the engine's own writers."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sslmedsam2.atomic import full_suffix
from sslmedsam2.errors import UserError
from sslmedsam2.models import get_model
from sslmedsam2.models.registry import check_image_size
from sslmedsam2.pipeline import METHODS, PropagateReport, load_case
from sslmedsam2.propagation.confidence import confidence_path, parse_confidence, write_result
from sslmedsam2.propagation.result import Progress
from sslmedsam2.server.client import Client, SessionGone
from sslmedsam2.volume.io import check_geometry_fits, check_output, check_table_output, read_volume

# Files sent as they are (gzip-compressed on the way where they are not already); anything else (a DICOM folder, a
# header with a separate data file) is sent as a compressed .nrrd written here.
_SENT_AS_IS = (".nii.gz", ".nii", ".nrrd", ".mha")


def image_payload(path: Path, image=None) -> tuple[bytes, str]:
    """The image as the server receives it: the file's own bytes and name, or a .nrrd of `image` (the image as
    read here; read again when not given)."""
    path = Path(path)
    if path.is_file() and full_suffix(path).lower() in _SENT_AS_IS:
        return path.read_bytes(), path.name
    import SimpleITK as sitk

    image = read_volume(path) if image is None else image
    with tempfile.TemporaryDirectory(prefix="sslmedsam2-upload-") as folder:
        target = Path(folder) / f"{path.name or 'image'}.nrrd"
        sitk.WriteImage(image, str(target), useCompression=True)
        return target.read_bytes(), target.name


def _check_options(options) -> None:
    if options.method not in METHODS:
        raise UserError(f"unknown method {options.method!r}; choose one of {', '.join(METHODS)}")
    if options.method == "interpolate":
        raise UserError("--method interpolate runs on this machine; leave out --server")
    if options.checkpoint is not None:
        raise UserError("--checkpoint names a file on this machine; a server uses its own weights "
                        "(sslmedsam2 serve --checkpoint), so leave out --checkpoint with --server")
    if options.compile:
        raise UserError("--compile is the server's setting (sslmedsam2 serve --compile); leave it out with --server")
    if options.model is not None:
        get_model(options.model)
    if options.image_size is not None:
        check_image_size(options.image_size)


def run_propagate_remote(image_path: Path, seeds_path: Path, output: Path, options, server: str,
                         token_file: Path | None = None, log: Callable[[str], None] = print,
                         progress: Progress | None = None, overwrite: bool = False) -> PropagateReport:
    """As `pipeline.run_propagate`: check everything first, write nothing unless all of it succeeds."""
    _check_options(options)
    output, inputs = Path(output), (Path(image_path), Path(seeds_path))
    check_output(output, inputs, overwrite)
    confidence = confidence_path(output)
    check_table_output(confidence, inputs, overwrite)
    started = time.perf_counter()
    client = Client(server, token_file=token_file)
    try:
        case = load_case(*inputs, options.axis, options.seed_slices, log, options.allow_uneven)  # as the local command
        check_geometry_fits(case.image, output, what=str(image_path))
        info = client.info()
        if options.device not in (None, "auto"):
            log(f"--device {options.device} is ignored with --server: the server computes on its {info['device']}")
        data, name = image_payload(Path(image_path), case.image)
        seeds = case.seeds.labels_map
        slices = {int(z): seeds[z] for z in np.flatnonzero(seeds.any(axis=(1, 2)))}
        intensity = options.intensity
        open_options = dict(axis=options.axis, modality=intensity.modality, window=intensity.window,
                            value_range=intensity.value_range, model=options.model, image_size=options.image_size)
        for attempt in (1, 2):
            try:
                with client.open_volume(data, name, **open_options) as volume:
                    result = volume.propagate(slices, progress=progress)
                    session = volume.info
                break
            except SessionGone as exc:
                if attempt == 2:
                    raise
                log(f"{exc}; opening it again")
        if result.labels.shape != case.volume.shape:
            raise UserError(f"the server answered a label map of shape {result.labels.shape} for a volume of "
                            f"{case.volume.shape}; is the server's sslmedsam2 version {info['version']} compatible?")
        write_result(case.to_image(result.labels), output, parse_confidence(result.confidence_csv))
    finally:
        client.close()
    return PropagateReport("sam2", output, confidence, case.seeds.labels, case.volume.shape[0],
                           time.perf_counter() - started, session["model"], f"{info['device']} at {client.url}")
