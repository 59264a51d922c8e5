"""A pure-Python signal: custom Qt signals are fragile in Slicer's PythonQt."""

from __future__ import annotations

from collections.abc import Callable


class Signal:
    def __init__(self, *types: type) -> None:
        self._types = types
        self._slots: list[Callable] = []

    def connect(self, slot: Callable) -> None:
        if slot not in self._slots:
            self._slots.append(slot)

    def disconnect(self, slot: Callable) -> None:
        self._slots.remove(slot)

    def emit(self, *args: object) -> None:
        if len(args) != len(self._types):
            raise TypeError(f"signal expects {len(self._types)} arguments, got {len(args)}")
        for slot in list(self._slots):
            slot(*args)
