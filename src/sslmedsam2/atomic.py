"""Atomic writes: a reader sees either the old file or the complete new one, never a half-written file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Multi-part suffixes that tools (SimpleITK, nnU-Net) recognise by the whole ending.
_COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd", ".tar.gz")


def full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix


def stem(path: Path) -> str:
    """File name without its (possibly compound) suffix: 'case.nii.gz' -> 'case'."""
    suffix = full_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (same suffix, so writers pick the same format); rename on success."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem(target)}.", suffix=f".tmp{full_suffix(target)}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` (an old folder is removed)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable(target: Path) -> None:
    """Fail before long work, not after it, when the output cannot be written."""
    from sslmedsam2.errors import UserError

    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {target}: folder {parent} does not exist")
    if target.is_dir() and full_suffix(target):
        raise UserError(f"cannot write {target}: it is a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=parent)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files a killed process left in `folder` (ours are named `.<stem>.<random>.tmp<suffix>`)."""
    removed = 0
    for path in Path(folder).glob(".*.tmp*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
