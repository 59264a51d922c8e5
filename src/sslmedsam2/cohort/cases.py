"""A cohort's cases: the images of a folder or of a list file, checked before any work."""

from __future__ import annotations

from pathlib import Path

from sslmedsam2.atomic import full_suffix
from sslmedsam2.errors import UserError
from sslmedsam2.volume.io import IMAGE_SUFFIXES, is_orthogonal, read_header


def _is_image_name(path: Path) -> bool:
    return full_suffix(path).lower() in IMAGE_SUFFIXES


def list_cases(source: Path, what: str = "input") -> list[Path]:
    """The images of a folder, or those a list file names (a text file, one path a line, relative to the list
    file's folder; blank lines and lines starting with # are skipped). Outputs are named after the input files,
    so two inputs of one name are refused."""
    source = Path(source)
    if source.is_dir():
        cases = sorted(p for p in source.iterdir() if p.is_file() and _is_image_name(p))
        if not cases:
            raise UserError(f"{what} folder {source} holds no image (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)")
        return cases
    if not source.is_file():
        raise UserError(f"{what} {source}: no such folder or list file")
    if _is_image_name(source):
        raise UserError(f"{what} {source} is an image: give a folder of images or a list file (one path a line)")
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} list {source}: cannot be read as text ({exc})") from None
    cases, names = [], {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(text).expanduser()
        path = path if path.is_absolute() else source.parent / path
        if not path.is_file() or not _is_image_name(path):
            raise UserError(f"{what} list {source}, line {number}: {text} is not an image file "
                            "(.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)")
        if path.name in names:
            raise UserError(f"{what} list {source}: two inputs named {path.name} ({names[path.name]} and {path}); "
                            "outputs are named after the input files: rename one")
        names[path.name] = path
        cases.append(path)
    if not cases:
        raise UserError(f"{what} list {source} names no image")
    return cases


def check_volumes(paths: list[Path], what: str) -> None:
    """Every case's header, before any work: a readable 3D image on an orthogonal grid (the NIfTI outputs store
    a rotation only). The voxels are read when the case's turn comes."""
    for path in paths:
        reader = read_header(path, what)
        if not is_orthogonal(reader.GetDirection()):
            raise UserError(f"{what} {path}: its direction matrix is not orthogonal (a sheared grid), which the NIfTI "
                            "outputs cannot store exactly; resample it onto an orthogonal grid first")
