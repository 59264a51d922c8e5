"""The per-user weight cache and checked, atomic downloads into it.

Many processes may start on an empty cache at once (the jobs of a cluster array sharing a cache folder): a download
holds a lock file beside the weights (`.<file>.lock`, filelock: released by the OS when its process dies), so one
process downloads and the others wait, then find the file in the cache. pooch downloads to a temporary file and
renames it only once its SHA256 matches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pooch
from filelock import FileLock, Timeout

from sslmedsam2.errors import UserError
from sslmedsam2.models.registry import ModelSpec

CACHE_ENV = "SSLMEDSAM2_CACHE"
MIRROR_ENV = "SSLMEDSAM2_MIRROR"  # base URL of a local copy of the weight files (firewalled sites, tests)
_CHUNK = 1 << 20


class ProgressBar(Protocol):
    """What pooch drives while downloading; a tqdm instance fits."""

    total: int | None

    def update(self, n: int) -> object: ...
    def reset(self) -> object: ...
    def close(self) -> object: ...


def cache_dir() -> Path:
    """Outside the code, per user, so an extension update or reinstall never deletes gigabytes of weights."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path(pooch.os_cache("sslmedsam2")) / "models"


def cached_path(spec: ModelSpec) -> Path:
    return cache_dir() / spec.filename


def is_cached(spec: ModelSpec) -> bool:
    path = cached_path(spec)
    return path.is_file() and path.stat().st_size == spec.size_bytes


def download_url(spec: ModelSpec) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    return f"{mirror.rstrip('/')}/{spec.filename}" if mirror else spec.url


def manual_install_hint(spec: ModelSpec) -> str:
    return (f"download {spec.url} by hand (SHA256 {spec.sha256}) and put it at {cached_path(spec)}, "
            f"or pass --checkpoint PATH")


def lock_path(spec: ModelSpec) -> Path:
    """The lock a download of `spec` holds, beside its file in the cache."""
    return cached_path(spec).with_name(f".{spec.filename}.lock")


def ensure_weights(spec: ModelSpec, progress: ProgressBar | bool = False, timeout: float = 60.0,
                   log: Callable[[str], None] | None = None) -> Path:
    """Return the cached checkpoint, downloading it first if needed; only a file with the right SHA256 is kept.
    One process at a time downloads into a cache folder (lock_path); the others wait for it (saying so through
    `log`) and then use its file."""
    target = cached_path(spec)
    if is_cached(spec):  # pooch only checks its SHA256: no lock, so a read-only shared cache serves too
        return _download(spec, progress, timeout)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(lock_path(spec))
        try:
            lock.acquire(timeout=0.5)
        except Timeout:
            if log is not None:
                log(f"another process is downloading {spec.name} into {target.parent}; waiting for it")
            lock.acquire()
    except OSError as exc:
        raise UserError(f"{spec.name}: cannot use the weight cache {target.parent} ({exc.strerror or exc}); set "
                        f"SSLMEDSAM2_CACHE to a writable folder, or pass --checkpoint PATH") from None
    try:
        return _download(spec, progress, timeout)
    finally:
        lock.release()


def _download(spec: ModelSpec, progress: ProgressBar | bool, timeout: float) -> Path:
    import requests

    url = download_url(spec)
    target = cached_path(spec)
    pooch.get_logger().setLevel("WARNING")  # we announce downloads ourselves
    downloader = pooch.HTTPDownloader(progressbar=progress, chunk_size=_CHUNK, timeout=timeout)
    try:
        path = pooch.retrieve(url, known_hash=f"sha256:{spec.sha256}", fname=spec.filename,
                              path=target.parent, downloader=downloader)
    except ValueError as exc:
        if "hash" in str(exc).lower():
            raise UserError(f"{spec.name}: the file downloaded from {url} failed its SHA256 check; nothing was saved "
                            f"(a proxy or a changed upstream file?); {manual_install_hint(spec)}") from None
        raise
    except requests.exceptions.HTTPError as exc:
        raise UserError(f"{spec.name}: download from {url} failed ({exc.response.status_code}); "
                        f"{manual_install_hint(spec)}") from None
    except requests.exceptions.RequestException as exc:
        kind = type(exc).__name__
        raise UserError(f"{spec.name}: cannot download {url} ({kind}: offline or interrupted?); "
                        f"{manual_install_hint(spec)}") from None
    return Path(path)


def find_weights(model: str | None, checkpoint: Path | None, download: bool, required: bool,
                 log=print, progress: ProgressBar | bool = False) -> Path | None:
    """The checkpoint to use: `checkpoint`, else the cached (or now downloaded) weights of `model`. Without them,
    a UserError when they are `required`, else None after saying why (the caller then interpolates)."""
    from sslmedsam2.models.registry import DEFAULT_MODEL, get_model

    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise UserError(f"checkpoint {checkpoint}: no such file")
        return Path(checkpoint)
    spec = get_model(model or DEFAULT_MODEL)
    try:
        if is_cached(spec) or download:
            if not is_cached(spec):
                log(f"downloading {spec.name} weights ({spec.size_bytes / 1e6:.0f} MB) to {cached_path(spec)}")
            return ensure_weights(spec, progress=progress, log=log)
        raise UserError(f"{spec.name} weights are not downloaded and downloading is off; {manual_install_hint(spec)}")
    except UserError as exc:
        if required:
            raise
        log(f"no SAM2 weights: {exc}")
    log("using --method interpolate (ITK morphological contour interpolation between the drawn slices) instead of SAM2")
    return None
