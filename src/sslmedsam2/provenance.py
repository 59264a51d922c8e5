"""The mark every file this tool writes carries, so that it replaces only its own files, and a label map and its
confidence table can be checked to belong together.

Images carry it in ITK's file notes (the NIfTI header's descrip, NRRD and MetaImage metadata): `sslmedsam2`, and
for a result `sslmedsam2 result <id>`. Tables carry it as their first line: `# sslmedsam2 <kind>` (and
`, result <id>`); csv readers that skip `#` comments (pandas: comment="#") read the rest as before.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from pathlib import Path

MARK = "sslmedsam2"
NOTES_KEY = "ITK_FileNotes"
_NOTES = re.compile(r"^sslmedsam2(?: result (?P<id>[0-9a-f]{8,32}))?\b")
_TABLE = re.compile(r"^# sslmedsam2\b[^\n]*?(?:, result (?P<id>[0-9a-f]{8,32}))?\s*$")


@dataclass(frozen=True)
class Mark:
    """What a file's mark says: written by this tool, and the result it belongs to (None: not a result)."""

    ours: bool
    result: str | None = None


NOT_OURS = Mark(False)


def new_result_id() -> str:
    return uuid.uuid4().hex[:16]


def image_notes(result: str | None = None) -> str:
    """The file notes of an image this tool writes (at most 80 characters: NIfTI's descrip)."""
    return f"{MARK} result {result}" if result else MARK


def notes_mark(notes: str | None) -> Mark:
    match = _NOTES.match((notes or "").strip())
    return Mark(True, match["id"]) if match else NOT_OURS


def table_header(kind: str, result: str | None = None) -> str:
    """The first line of a table this tool writes."""
    return f"# {MARK} {kind}" + (f", result {result}" if result else "") + "\n"


def text_mark(text: str) -> Mark:
    """The mark of a table's text (its first line)."""
    match = _TABLE.match(text.split("\n", 1)[0].rstrip("\r"))
    return Mark(True, match["id"]) if match else NOT_OURS


def table_mark(path: Path) -> Mark:
    """The mark of a table file; NOT_OURS for a file that cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return text_mark(handle.readline(4096))
    except OSError:
        return NOT_OURS
