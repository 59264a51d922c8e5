"""Safe outputs: atomic, verified writes that honour the umask, and the checks that keep a run from overwriting
what it did not create (an input, a folder of someone's files) or another job's temporary files."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from sslmedsam2.errors import UserError

# Multi-part suffixes that tools (SimpleITK, nnU-Net) recognise by the whole ending.
_COMPOUND_SUFFIXES = (".nii.gz", ".seg.nrrd", ".tar.gz")
# Temporary names carry host and pid, so a cleanup removes only what a dead process of this host left behind
# (shards of one job may share a folder, also from other hosts over a network file system).
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9-]+)-(?P<pid>\d+)-[^.]*\.tmp")


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


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:  # reading it means setting it: two threads at once would leave the wrong one behind
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _publish_mode(path: Path, folder: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; a result is created as any file the user makes."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def fsync_file(path: Path) -> None:
    """Flush to disk: a full disk surfaces here (delayed allocation), and a crash cannot leave an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_prefix(name: str) -> str:
    return f".{name}.{_HOST}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` (same suffix, so writers pick the same format); on success it is
    flushed to disk, given the umask's mode and renamed over `target`; on failure it is removed."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(stem(target)), suffix=f".tmp{full_suffix(target)}",
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        _publish_mode(tmp_path)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`.

    Callers must have checked (check_output) that an existing `target` is a folder this tool wrote.
    """
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        for entry in tmp.iterdir():
            if entry.is_file():
                fsync_file(entry)
                _publish_mode(entry)
        _publish_mode(tmp, folder=True)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
            return
        old = None
        if target.exists():  # no atomic exchange here: a kill between these renames is undone by the next run
            old = target.with_name(f"{temp_prefix(target.name)}old.tmp")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` the file `source` is: a hard link, or a copy where the file system has none; atomic (a
    reader sees the old file or the new one)."""
    target = Path(target)
    temp = target.with_name(f"{temp_prefix(target.name)}link.tmp")
    temp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    """Atomic; a failed write (full disk, permissions) is a UserError naming the file and leaves nothing."""
    try:
        with atomic_path(target) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None


def check_writable(target: Path, folder_output: bool = False) -> None:
    """Fail before long work, not after it, when the output cannot be written.

    `folder_output`: the output is a folder (a DICOM series) that the writer replaces as a whole.
    """
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {target}: folder {parent} does not exist")
    if target.is_dir() and not folder_output:
        raise UserError(f"cannot write {target}: it is a folder; name a file")
    if target.exists() and not target.is_dir() and folder_output:
        raise UserError(f"cannot write a DICOM series folder {target}: a file of that name exists")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=parent)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def same_path(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


_NIFTI_NAME = re.compile(r"^(?P<base>.*)\.(nii|hdr|img)(\.gz)?$", re.IGNORECASE)


def _nifti_base(path: Path) -> str | None:
    """'scan' for scan.nii, scan.nii.gz, scan.hdr, scan.img(.gz): NIfTI tools take any of these for the others."""
    match = _NIFTI_NAME.match(path.name)
    return match["base"] if match else None


def check_not_input(outputs: Iterable[Path], inputs: Iterable[Path | None]) -> None:
    """Refuse an output that is one of the inputs, lies inside an input folder, is a folder holding an input, or
    is a NIfTI name beside an input of the same name (`img.nii` beside `img.nii.gz`: NIfTI readers, SimpleITK's
    among them, read one for the other): writing it would destroy or shadow what the run reads."""
    inputs = [Path(p) for p in inputs if p is not None]
    for output in (Path(o) for o in outputs):
        out = output.resolve()
        for source in inputs:
            src = source.resolve()
            if same_path(output, source) or out == src:
                raise UserError(f"output {output} is the input {source}; choose another output name")
            base = _nifti_base(output)
            if base is not None and base == _nifti_base(source) and out.parent == src.parent:
                raise UserError(f"output {output} would lie beside the input {source} under the same NIfTI name, "
                                "and NIfTI readers take one for the other; choose another output name")
            if source.is_dir() and src in out.parents:
                raise UserError(f"output {output} is inside the input folder {source}; write it elsewhere")
            if src.is_relative_to(out) and out != src:
                raise UserError(f"output {output} is a folder that holds the input {source}; write it elsewhere")
        cwd = Path.cwd().resolve()
        if cwd == out or out in cwd.parents:
            raise UserError(f"output {output} is the current folder or one of its parents; name a new file or folder")


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files and folders that a killed process of this host left in `folder`; a replaced
    folder set aside by atomic_dir whose replacement never arrived is put back (the old result, not none).

    Only names of our pattern whose process is gone; a job still running (another shard) keeps its files.
    """
    removed = 0
    for path in Path(folder).glob(".*.tmp*"):
        match = _TEMP.match(path.name)
        if match is None or match["host"] != _HOST or _pid_alive(int(match["pid"])):
            continue
        old = f".{match['host']}-{match['pid']}-old.tmp"
        if path.is_dir() and path.name.endswith(old) and not (path.parent / path.name[1:-len(old)]).exists():
            os.replace(path, path.parent / path.name[1:-len(old)])  # killed between atomic_dir's two renames
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) is not a liveness check on Windows
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        ctypes.windll.kernel32.CloseHandle(handle)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
