"""Access tokens: read from a file (never from the command line, where `ps` shows them to every user), compared in
constant time. Standard library only (the client reads its token with this too)."""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from pathlib import Path

from sslmedsam2.errors import UserError

MIN_TOKEN_LENGTH = 16
MAKE_TOKEN = "python -c \"import secrets; print(secrets.token_urlsafe(32))\" > FILE && chmod 600 FILE"


def _lines(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not the token
    except FileNotFoundError:
        raise UserError(f"token file {path}: no such file; make one with: {MAKE_TOKEN}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"token file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _check_private(path: Path) -> None:
    """Like ssh with its keys: a token file that other users can read protects nothing."""
    if os.name != "posix":
        return
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise UserError(f"token file {path}: no such file; make one with: {MAKE_TOKEN}") from None
    except OSError as exc:
        raise UserError(f"token file {path}: cannot read it ({exc.strerror or exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"token file {path}: other users can read or change it (mode {stat.filemode(mode)}); "
                        f"run: chmod 600 {path}")


def _check_token(token: str, path: Path) -> str:
    # an HTTP header carries printable ASCII only
    if len(token) < MIN_TOKEN_LENGTH or not (token.isascii() and token.isprintable()) or " " in token:
        raise UserError(f"token file {path}: a token is one line of at least {MIN_TOKEN_LENGTH} ASCII characters "
                        f"without spaces; make one with: {MAKE_TOKEN}")
    return token


def read_server_tokens(path: Path) -> list[str]:
    """The tokens a server accepts: one per line (one per person; each sees only the sessions it opened)."""
    _check_private(path)
    tokens = [_check_token(t, path) for t in _lines(path)]
    if not tokens:
        raise UserError(f"token file {path}: holds no token; make one with: {MAKE_TOKEN}")
    if len(set(tokens)) != len(tokens):
        raise UserError(f"token file {path}: the same token is listed twice")
    return tokens


def read_client_token(path: Path) -> str:
    """The token a client sends: the file's first token line."""
    _check_private(path)
    tokens = _lines(path)
    if not tokens:
        raise UserError(f"token file {path}: holds no token")
    return _check_token(tokens[0], path)


class TokenCheck:
    """Which configured token (if any) a request carries. Every configured token is compared, in constant time,
    whatever matches first, so the answer's timing says nothing about the tokens."""

    def __init__(self, tokens: list[str]) -> None:
        self._tokens = [t.encode("utf-8") for t in tokens]

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def owner(self, presented: str | None) -> str | None:
        """An opaque owner name for a valid token (sessions are scoped to it); None when the token is wrong."""
        if not self._tokens:
            return "local"
        given = (presented or "").encode("utf-8")
        found = None
        for token in self._tokens:
            if secrets.compare_digest(given, token) and found is None:
                found = token
        return None if found is None else hashlib.sha256(found).hexdigest()[:16]
