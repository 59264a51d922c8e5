"""The only place sslmedsam2 loads an nnU-Net checkpoint, and the plans and dataset files that go with it.

A checkpoint is a pickle, and nnU-Net's own loaders (`nnUNetTrainer.load_checkpoint`, `nnUNetPredictor.
initialize_from_trained_model_folder`) unpickle with `weights_only=False`: a planted `checkpoint_final.pth` would
run code on load. Here a checkpoint is loaded only when both checks pass:
- its SHA-256 is the one recorded by the refine run that wrote it (`WS/refine/checkpoints.sha256`, `sha256sum`
  format, paths relative to `WS/refine`), checked on the very bytes that are then unpickled;
- `torch.load(weights_only=True)` with the allow-list `allowed_globals()`: tensors, containers, `torch.device` (torch's
  own list) and the numpy scalars nnU-Net's logger stores; any other global is refused before anything is built.
plans.json names Python objects that nnU-Net imports (`pydoc.locate`) and calls; `check_plans` allows only
dynamic_network_architectures' U-Nets and torch.nn layers, `check_trainer` only the trainer this project writes.
A refusal is one `UserError` naming the file and what to do; nothing of the file has run.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from sslmedsam2.atomic import atomic_path, remove_stale_temporaries, write_text
from sslmedsam2.errors import UserError

MANIFEST = "checkpoints.sha256"
TRAINER = "nnUNetTrainer"  # the only trainer this project trains (refine.nnunet.ReportingTrainer's name)
_NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")  # dynamic_network_architectures' U-Nets
_LAYERS = ("Conv1d", "Conv2d", "Conv3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "BatchNorm1d",
           "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
           "LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SiLU", "Tanh", "Sigmoid")


def allowed_globals() -> list:
    """What an nnU-Net 2.8 checkpoint needs beyond torch's weights-only defaults (tensors, OrderedDict,
    torch.device for `init_args['device']`): its logger's numpy scalars (np.float32; np.float64 where numpy 1.x
    promotes the moving average), pickled as numpy's scalar reconstructor, `numpy.dtype` and the dtype's class."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    return [scalar, np.dtype, type(np.dtype(np.float32)), type(np.dtype(np.float64))]


def _refused(path: Path, reason: str, remedy: str) -> UserError:
    return UserError(f"{path}: {reason}; it was not used. {remedy}")


# --- digests -----------------------------------------------------------------------------------------------------
def _key(path: Path, manifest: Path) -> str:
    path, base = Path(path).resolve(), manifest.parent.resolve()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else path.as_posix()


def read_manifest(manifest: Path) -> dict[str, set[str]]:
    """{path relative to the manifest's folder: recorded digests} (two only while a save is being published)."""
    entries: dict[str, set[str]] = {}
    if manifest.is_file():
        for line in manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            digest, sep, name = line.partition("  ")
            if sep and len(digest) == 64:
                entries.setdefault(name.removeprefix("*"), set()).add(digest.lower())
    return entries


def _write_manifest(manifest: Path, entries: dict[str, set[str]], keep: str = "") -> None:
    """Atomic; entries of files that are gone (nnU-Net deletes checkpoint_latest at the end) are dropped, except
    `keep` (a file about to appear)."""
    base = manifest.parent
    kept = {name: digests for name, digests in entries.items() if name == keep or (base / name).is_file()}
    write_text(manifest, "".join(f"{d}  {name}\n" for name in sorted(kept) for d in sorted(kept[name])))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_recorded(save: Callable[[Path], None], target: Path, manifest: Path, companions: Iterable[Path] = ()) -> None:
    """`save(tmp)` writes a checkpoint; it replaces `target` atomically and its digest (and those of `companions`,
    the model's plans.json and dataset.json) is recorded in `manifest`. At every instant the file at `target` has
    a recorded digest, so a run killed at any point resumes without a false refusal."""
    target = Path(target)
    remove_stale_temporaries(target.parent)  # a partial checkpoint of a killed run (hundreds of MB)
    with atomic_path(target) as tmp:
        save(tmp)
        digest = _file_sha256(tmp)
        entries = read_manifest(manifest)
        key = _key(target, manifest)
        entries.setdefault(key, set()).add(digest)  # the old file's digest stays until it is replaced
        _write_manifest(manifest, entries, keep=key)
    entries[key] = {digest}
    for companion in companions:
        entries[_key(companion, manifest)] = {_file_sha256(companion)}
    _write_manifest(manifest, entries)


def forget_missing(manifest: Path) -> None:
    """Drop the entries of files that are gone (checkpoint_latest.pth after a finished training)."""
    entries = read_manifest(manifest)
    if any(not (manifest.parent / name).is_file() for name in entries):
        _write_manifest(manifest, entries)


def verified_bytes(path: Path, manifest: Path, remedy: str) -> bytes:
    """The file's bytes, if their SHA-256 is recorded for it in `manifest` (read once: what is checked is what
    is used)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _refused(path, f"cannot be read ({exc.strerror or exc})", remedy) from None
    recorded = read_manifest(manifest).get(_key(path, manifest))
    if not recorded:
        raise _refused(path, f"no digest of it recorded in {manifest} (not written by this workspace's refine, "
                             "or by an sslmedsam2 before checkpoints were recorded)", remedy)
    if sha256(data) not in recorded:
        raise _refused(path, f"changed since refine wrote it (its SHA-256 differs from the one in {manifest})",
                       remedy)
    return data


def load_json(path: Path, manifest: Path, remedy: str) -> dict:
    """A model's plans.json or dataset.json, digest-checked like its checkpoint."""
    try:
        data = json.loads(verified_bytes(path, manifest, remedy))
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise _refused(Path(path), "not a JSON object", remedy)
    return data


# --- checkpoints -------------------------------------------------------------------------------------------------
def _unsafe_globals(data: bytes) -> list[str]:
    import torch

    names = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if names is None:  # torch < 2.6
        return []
    try:
        allowed = {f"{g.__module__}.{g.__name__}" for g in allowed_globals()}
        return [n for n in names(io.BytesIO(data)) if n not in allowed]
    except Exception:  # not a zip checkpoint: torch.load's own refusal says it
        return []


def load_checkpoint(path: Path, manifest: Path, remedy: str, map_location="cpu") -> dict:
    """An nnU-Net checkpoint: its digest checked, then unpickled weights-only with `allowed_globals()`."""
    import torch

    path = Path(path)
    data = verified_bytes(path, manifest, remedy)
    unsafe = _unsafe_globals(data)
    if unsafe:
        raise _refused(path, f"it holds {', '.join(unsafe[:3])}, which no nnU-Net checkpoint holds and which "
                             "could run code", remedy)
    try:
        with torch.serialization.safe_globals(allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on an old pickle protocol: the refusal is one line
            checkpoint = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)|but got (<[^>]+>)", str(exc))
        detail = f" ({found.group(1) or found.group(2)})" if found else ""
        raise _refused(path, f"it holds objects other than weights{detail}, which could run code", remedy) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as exc:
        raise _refused(path, f"not a readable PyTorch checkpoint ({type(exc).__name__})", remedy) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise _refused(path, "not an nnU-Net checkpoint (no network_weights)", remedy)
    return checkpoint


def check_trainer(checkpoint: dict, configuration: str, path: Path, remedy: str) -> None:
    """The checkpoint names the trainer and configuration this project trains (nnU-Net would import the trainer
    class it names)."""
    name = checkpoint.get("trainer_name")
    if name != TRAINER:
        raise _refused(Path(path), f"it names the trainer {name!r}; sslmedsam2 trains and loads only {TRAINER}",
                       remedy)
    init = checkpoint.get("init_args")
    if not isinstance(init, dict) or init.get("configuration") != configuration:
        found = init.get("configuration") if isinstance(init, dict) else None
        raise _refused(Path(path), f"trained for configuration {found!r}, not {configuration!r}", remedy)


# --- plans -------------------------------------------------------------------------------------------------------
def allowed_names() -> tuple[frozenset[str], frozenset[str]]:
    """(network classes, layer classes) that plans.json may name, each as nnU-Net's planner writes it
    (`torch.nn.modules.conv.Conv3d`) and as `torch.nn.X`."""
    import torch

    networks = frozenset(f"dynamic_network_architectures.architectures.unet.{n}" for n in _NETWORKS)
    layers = set()
    for name in _LAYERS:
        cls = getattr(torch.nn, name)
        layers |= {f"torch.nn.{name}", f"{cls.__module__}.{name}"}
    return networks, frozenset(layers)


def check_plans(plans: dict, configuration: str, path: Path, remedy: str) -> None:
    """The classes the configuration's network is built from (what nnU-Net passes to `pydoc.locate`) are
    allow-listed; nothing is imported to find out."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    networks, layers = allowed_names()
    if not isinstance(plans, dict):  # PlansManager would read a string as the path of a plans file
        raise _refused(Path(path), "not a JSON object", remedy)
    try:
        manager = PlansManager(plans).get_configuration(configuration)
        network = manager.network_arch_class_name
        kwargs = manager.network_arch_init_kwargs
        imported = {key: kwargs.get(key) for key in manager.network_arch_init_kwargs_req_import}
    except Exception as exc:  # noqa: BLE001  (a malformed file: KeyError, TypeError, RuntimeError, ...)
        detail = (str(exc).splitlines() or [""])[0][:120]
        raise _refused(Path(path), f"no usable configuration {configuration!r} ({type(exc).__name__}: {detail})",
                       remedy) from None
    if not isinstance(network, str) or network not in networks:
        raise _refused(Path(path), f"its network class {network!r} is not one of dynamic_network_architectures' "
                                   "U-Nets, which are all sslmedsam2 builds", remedy)
    for key, value in imported.items():
        if value is not None and (not isinstance(value, str) or value not in layers):
            raise _refused(Path(path), f"its {key} {value!r} is not a torch.nn layer sslmedsam2 allows", remedy)
