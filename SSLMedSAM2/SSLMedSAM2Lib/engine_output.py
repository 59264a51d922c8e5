"""Reading the engine's stderr as a QProcess delivers it: tqdm bars (carriage returns) and `sslmedsam2:` lines."""

from __future__ import annotations

import re
from dataclasses import dataclass

# tqdm bars: "propagate:  45%|####  | 21/46 [...]", and pooch's download bar "  2%|#  | 3.15M/156M [...]"
_BAR = re.compile(r"^(?:[\w .:-]+?:)?\s*\d+%\|.*?\|\s*(?P<done>[\d.]+)(?P<done_unit>[kMGT]?)"
                  r"/(?P<total>[\d.]+)(?P<total_unit>[kMGT]?)")
_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_MESSAGE = "sslmedsam2: "
_ERROR = "sslmedsam2: error: "


@dataclass
class OutputUpdate:
    progress: tuple[int, int] | None = None  # (done, total) of the latest bar
    messages: list[str] | None = None  # plain lines for the log
    error: str | None = None  # the engine's one-line error, if it gave one


class EngineOutput:
    """Feed it chunks of text; it keeps the unfinished tail for the next chunk."""

    def __init__(self) -> None:
        self._tail = ""
        self.error: str | None = None

    def feed(self, chunk: str) -> OutputUpdate:
        text = self._tail + chunk
        pieces = re.split(r"[\r\n]", text)
        self._tail = pieces.pop()  # not yet terminated
        update = OutputUpdate(messages=[])
        for piece in (p.strip() for p in pieces):
            if not piece:
                continue
            bar = _BAR.match(piece)
            if bar:
                update.progress = (int(float(bar["done"]) * _UNITS[bar["done_unit"]]),
                                   int(float(bar["total"]) * _UNITS[bar["total_unit"]]))
            elif piece.startswith(_ERROR):
                self.error = update.error = piece[len(_ERROR):]
            else:
                update.messages.append(piece[len(_MESSAGE):] if piece.startswith(_MESSAGE) else piece)
        return update
