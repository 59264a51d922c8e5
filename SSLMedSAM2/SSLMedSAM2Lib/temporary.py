"""Temporary folders that hold patient images (volumes exported for a few-shot run, its default output, a prediction,
the installer's constraints): each is deleted when its job ends, and whatever is left at scene close or Slicer's exit.
No Slicer here: the logic calls `remove_all` at scene close and registers it for Slicer's exit."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path


class TemporaryFolders:
    """Folders made here and not yet removed; thread-safe (the exit hook may run on another thread)."""

    def __init__(self) -> None:
        self._folders: list[Path] = []
        self._lock = threading.Lock()

    def make(self, prefix: str) -> Path:
        """A new private folder (mkdtemp: 0700 on POSIX), remembered until it is removed."""
        folder = Path(tempfile.mkdtemp(prefix=prefix))
        with self._lock:
            self._folders.append(folder)
        return folder

    def remove(self, *folders: Path | str | None) -> None:
        """Delete these folders now, if they were made here: None, one already removed and any other folder (a
        user's) are left alone."""
        for folder in folders:
            if folder is None:
                continue
            folder = Path(folder)
            with self._lock:
                if folder not in self._folders:
                    continue
                self._folders.remove(folder)
            shutil.rmtree(folder, ignore_errors=True)

    def remove_all(self) -> None:
        with self._lock:
            folders, self._folders = self._folders, []
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def folders(self) -> list[Path]:
        with self._lock:
            return list(self._folders)


TEMPORARY = TemporaryFolders()  # one per Slicer session: the module's exit hook empties it
