"""The module's settings and the engine command lines they turn into: checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from SSLMedSAM2Lib.launch import command_problem, import_engine
from SSLMedSAM2Lib.requirements import CLIENT, ENGINE

import_engine()
from sslmedsam2 import settings as engine_settings  # noqa: E402 (the engine's lists and rules: no copies here)
from sslmedsam2.remote.addresses import is_loopback  # noqa: E402

MODELS = engine_settings.MODEL_NAMES
DEVICES = engine_settings.DEVICES
AXES = engine_settings.AXES
ENGINES = ("local", "remote")


@dataclass
class EngineSettings:
    """The panel's engine settings as its parameter node keeps them (strings and numbers a widget shows); the
    engine's EngineSettings checks them."""

    model: str = engine_settings.DEFAULT_MODEL
    checkpoint: str = ""  # a local file instead of the cached download
    image_size: int = 0  # 0: the model's own
    device: str = "auto"
    axis: str = "axial"
    modality: str = "mri"
    allow_download: bool = False  # set once the user agreed to download weights

    def engine(self) -> "engine_settings.EngineSettings":
        from sslmedsam2.frames import IntensitySpec

        return engine_settings.EngineSettings(
            method="sam2", model=self.model, checkpoint=Path(self.checkpoint) if self.checkpoint else None,
            image_size=self.image_size or None, device=self.device, axis=self.axis,
            intensity=IntensitySpec(modality=self.modality) if self.modality in engine_settings.MODALITIES
            else IntensitySpec(), download=self.allow_download)


@dataclass
class Connection:
    """Where Propagate runs: a `sslmedsam2 serve` the module starts on this machine (in Slicer's Python, or from the
    engine command: another Python environment's sslmedsam2), or one at a URL."""

    engine: str = "local"
    url: str = ""  # remote: http://HOST:PORT (an SSH tunnel's http://127.0.0.1:PORT, say)
    token_file: str = ""  # remote: a file holding the server's access token (none for a tunnel to a loopback server)
    command: str = ""  # local: the sslmedsam2 program of another Python environment ("": Slicer's own Python)

    @property
    def need(self) -> str:
        """What Slicer's Python needs for Propagate: the thin client, unless the engine runs in Slicer's Python."""
        return CLIENT if self.engine == "remote" or self.command else ENGINE

    @property
    def jobs_command(self) -> str:
        """Where the module's jobs on this machine run (few-shot, the study's model, refinement): the engine
        command's environment when the local engine has one, else ("") Slicer's own Python."""
        return self.command if self.engine == "local" else ""

    @property
    def jobs_need(self) -> str:
        """What Slicer's Python needs for those jobs: the thin client when they run with the engine command."""
        return CLIENT if self.jobs_command else ENGINE


def plain_http_warning(url: str) -> str:
    """The reason to confirm a remote engine's address once ("" when there is none): plain http beyond this
    computer sends the volume and the token unencrypted."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError:
        return ""
    if parts.scheme != "http" or not host or is_loopback(host):
        return ""
    return (f"The remote engine {parts.scheme}://{parts.netloc} is reached over plain http: the patient's images, the "
            "results and the access token cross the network unencrypted, readable by anyone on the way. Use an SSH "
            "tunnel (http://127.0.0.1:PORT, see docs/server.md) or https. Use this address anyway?")


def connection_problems(connection: Connection) -> list[str]:
    """Everything wrong with the engine setting, as sentences for the GUI."""
    if connection.engine not in ENGINES:
        return [f"Unknown engine {connection.engine!r}; choose local or remote."]
    if connection.engine == "local":
        problem = command_problem(connection.command) if connection.command else None
        return [problem] if problem else []
    found = []
    if not connection.url.startswith(("http://", "https://")) or len(connection.url.split("//", 1)[1]) < 1:
        found.append("Give the remote engine's address as http://HOST:PORT (through an SSH tunnel: "
                     "http://127.0.0.1:PORT).")
    if connection.token_file and not Path(connection.token_file).is_file():
        found.append(f"Token file {connection.token_file} does not exist.")
    return found


def jobs_problems(connection: Connection) -> list[str]:
    """What keeps the jobs on this computer (few-shot, the study's model, refinement) from running with the local
    engine's engine command ([] without one)."""
    problem = command_problem(connection.jobs_command) if connection.jobs_command else None
    return [problem] if problem else []


def problems(settings: EngineSettings) -> list[str]:
    """Everything wrong with the settings, as sentences for the GUI (empty: good to go): the engine's own checks."""
    found = [f"{text[0].upper()}{text[1:]}." for text in settings.engine().problems()]
    if settings.modality not in engine_settings.MODALITIES:
        found.append(f"Unknown modality {settings.modality!r}.")
    return found


def _model_args(settings: EngineSettings, device: bool = True) -> list[str]:
    args = ["--model", settings.model] + (["--device", settings.device] if device else [])
    if settings.checkpoint:
        args += ["--checkpoint", settings.checkpoint]
    if settings.image_size:
        args += ["--image-size", str(settings.image_size)]
    if not settings.allow_download:
        args.append("--no-download")
    return args


def pseudolabel_command(settings: EngineSettings, support_images: str, support_labels: str, query: str,
                        output: str, insertions: int = 5, supports: int = 0) -> list[str]:
    args = ["pseudolabel", "--support-images", support_images, "--support-labels", support_labels, "--query", query,
            "-o", output, "--insertions", str(insertions), "--axis", settings.axis, "--modality", settings.modality,
            *_model_args(settings)]
    return args + (["--supports", str(supports)] if supports else [])


def refine_command(workspace: str, rounds: int = 5, quick: bool = False, warm_start: bool = False,
                   device: str = "auto", ignore: str = "rejected", sam2: EngineSettings | None = None) -> list[str]:
    """`sam2`: also prompt SAM2 with nnU-Net's key slices in every round (--sam2-from-nnunet), with these model
    settings; the device is nnU-Net's and SAM2's alike."""
    args = ["refine", workspace, "--rounds", str(rounds), "--device", device, "--ignore", ignore]
    args += (["--quick"] if quick else []) + (["--warm-start"] if warm_start else [])
    if sam2 is not None:
        args += ["--sam2-from-nnunet", *_model_args(sam2, device=False)]
    return args


def predict_command(workspace: str, image: str, output: str, device: str = "auto") -> list[str]:
    """The workspace's latest refined nnU-Net on one image; writes OUTPUT and its .confidence.csv."""
    return ["predict", workspace, image, "-o", output, "--device", device]


def keyslices_command(prediction: str, output: str, confidence: str, axis: str) -> list[str]:
    """The slices of a prediction most worth prompting SAM2 with, ranked by the prediction's own confidence table."""
    return ["keyslices", prediction, "-o", output, "--prob", confidence, "--axis", axis]


def serve_command(settings: EngineSettings, port: int, token_file: str) -> list[str]:
    """The module's local engine: loopback only, a token all the same (other users of this machine must not reach
    it), the panel's model built at start."""
    return ["serve", "--host", "127.0.0.1", "--port", str(port), "--token-file", token_file, "--exit-with-stdin",
            *_model_args(settings)]
