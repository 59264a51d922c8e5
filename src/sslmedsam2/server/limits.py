"""What a server may hold: its settings, and the memory budget of cached slice features (least recently used out)."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

from sslmedsam2.memory import available_memory
from sslmedsam2.settings import EditRule, EngineSettings
from sslmedsam2.errors import UserError
from sslmedsam2.server.errors import OutOfMemory, TooLarge

GB = 1 << 30
MB = 1 << 20
SMALL_BODY = MB  # request bodies up to this size are read without waiting for an upload's turn


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    device: str = "auto"
    model: str | None = None  # None: the engine's default model
    checkpoint: Path | None = None  # weights of `model`; None: the cached (or downloaded) ones
    image_size: int | None = None  # None: the model's own
    download: bool = True
    memory_budget: int | None = None  # bytes of cached features, all sessions; None: default_budget()
    max_sessions: int = 8
    max_sessions_per_token: int | None = None  # None: the default of per_token_sessions
    idle_timeout_s: float = 1800.0  # a session unused this long is closed and its data deleted
    max_request_bytes: int = 1024 * MB  # the largest request body (an image upload), compressed
    max_voxels: int = 1 << 29  # the largest image: 512 x 512 x 2048 voxels, 2 GiB as float32 while read
    job_retention_s: float = 3600.0  # finished jobs stay readable this long
    tokens: list[str] = field(default_factory=list)  # empty: no token (then only a loopback address is allowed)
    workdir: Path | None = None  # where the server's private temporary folder goes (default: the system's)
    compile: bool = False  # SAM2's tracking step compiled (propagation/compiled.py)
    max_uploads: int = 2  # request bodies over SMALL_BODY read (and decoded) at once; more wait for a turn
    upload_wait_s: float = 120.0  # how long an upload waits for its turn before it is refused (409)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (from connecting or the last answer)
    body_timeout_s: float = 60.0  # a request body that sends nothing for this long is dropped (408)
    edit_rule: EditRule = EditRule()  # when an edit's local re-tracking stops (--edit-window, --edit-agreement)

    @property
    def per_token_sessions(self) -> int:
        """Open sessions one token may hold: --max-sessions-per-token, else half of --max-sessions (at least 1) when
        the token file holds several tokens, else all of them (nobody to share them with)."""
        if self.max_sessions_per_token is not None:
            return self.max_sessions_per_token
        return max(1, self.max_sessions // 2) if len(self.tokens) > 1 else self.max_sessions

    def engine(self) -> EngineSettings:
        """The default engine settings of the sessions this server opens (the one settings object)."""
        return EngineSettings(method="sam2", model=self.model, checkpoint=self.checkpoint, image_size=self.image_size,
                              device=self.device, download=self.download, compile=self.compile)

    def check(self) -> None:
        self.engine().check()
        self.edit_rule.check()
        if self.max_sessions < 1:
            raise UserError("--max-sessions must be at least 1")
        if self.max_sessions_per_token is not None and not 1 <= self.max_sessions_per_token <= self.max_sessions:
            raise UserError(f"--max-sessions-per-token must be between 1 and --max-sessions ({self.max_sessions})")
        if self.max_uploads < 1:
            raise UserError("max_uploads must be at least 1")
        for name in ("upload_wait_s", "header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise UserError(f"{name} must be a positive number")
        if not (self.idle_timeout_s > 0 and math.isfinite(self.idle_timeout_s)):
            raise UserError("--idle-timeout must be a positive number")
        if self.max_request_bytes < MB:
            raise UserError("--max-request-mb must be at least 1")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise UserError("--memory-budget must be positive")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: not a port number")


def default_budget(gpu_free: int | None) -> int:
    """Half of the main memory available at start, plus 40 % of a GPU's free memory (features live on the GPU
    while they fit there, else in main memory)."""
    return int(0.5 * available_memory() + 0.4 * (gpu_free or 0))


def parse_gb(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--memory-budget {text!r}: a number of gigabytes, e.g. 8 or 0.5") from None
    if not (value > 0 and math.isfinite(value)):
        raise UserError(f"--memory-budget {text!r}: must be a positive number")
    return int(value * GB)


def human(size: int) -> str:
    return f"{size / GB:.2f} GB" if size >= GB else f"{size / MB:.0f} MB"


class FeatureBudget:
    """Cached features of all sessions, plus the uploads being read, stay under `limit` bytes: before a volume is
    encoded or an upload read, the least recently used volumes that are not busy lose their features (they are
    encoded again when next propagated). Uploads cannot give anything up: those in flight must fit by themselves."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.uploads = 0  # bytes of request bodies being read or decoded now

    def check_upload(self, size: int, others: int) -> None:
        """Refuse an upload of `size` bytes that the budget cannot hold: never (413), or not beside the `others`
        bytes of uploads in flight (507)."""
        if size > self.limit:
            raise TooLarge(f"the upload ({human(size)}) is larger than the server's memory budget "
                           f"({human(self.limit)}); send a smaller image, or start the server with a larger "
                           "--memory-budget")
        if others + size > self.limit:
            raise OutOfMemory(f"the server's memory budget ({human(self.limit)}) is taken by other uploads being "
                              "read; send this one again in a moment")

    def check_fits(self, need: int, what: str) -> None:
        if need > self.limit:
            raise TooLarge(f"{what}: its slice features need {human(need)}, more than the server's memory budget "
                           f"({human(self.limit)}); open it with a smaller image size, or start the server with a "
                           "larger --memory-budget")

    def victims(self, need: int, holders: list[tuple[Hashable, int, float, bool]]) -> list[Hashable]:
        """Which holders (key, bytes held, last used, busy) give up their features so that `need` more fits,
        least recently used first. Busy holders keep theirs (the budget may then be exceeded for a while)."""
        used = self.uploads + sum(size for _, size, _, _ in holders)
        out = []
        for key, size, _, busy in sorted(holders, key=lambda h: h[2]):
            if used + need <= self.limit:
                break
            if size and not busy:
                out.append(key)
                used -= size
        return out
