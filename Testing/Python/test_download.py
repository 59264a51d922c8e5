"""Weight downloads against a local HTTP server: progress, checksum, interruption, offline, cache reuse."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import PAYLOAD

from sslmedsam2.cli import main
from sslmedsam2.errors import UserError
from sslmedsam2.models import get_model
from sslmedsam2.models.cache import cached_path, ensure_weights, is_cached

def _spec(payload=PAYLOAD):
    return replace(get_model("sam2.1-tiny"), sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload))


def _cache_listing(spec) -> list[str]:
    folder = cached_path(spec).parent
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


class _Progress:
    def __init__(self):
        self.total, self.done, self.closed = None, 0, False

    def update(self, n):
        self.done += n

    def reset(self):
        self.done = 0

    def close(self):
        self.closed = True


def test_download_reports_progress_checks_and_caches(server):
    httpd, _ = server
    spec, progress = _spec(), _Progress()
    path = ensure_weights(spec, progress=progress)
    assert Path(path) == cached_path(spec) and Path(path).read_bytes() == PAYLOAD
    assert progress.total == len(PAYLOAD) and progress.done == len(PAYLOAD) and progress.closed
    assert is_cached(spec)
    ensure_weights(spec)  # second use: from the cache
    assert httpd.requests == 1


def test_checksum_mismatch_is_refused_and_nothing_kept(server):
    spec = replace(_spec(), sha256="0" * 64)
    with pytest.raises(UserError, match="SHA256"):
        ensure_weights(spec)
    assert _cache_listing(spec) == []


def test_interrupted_download_leaves_no_file(server):
    _, handler = server
    handler.truncate = True
    spec = _spec()
    with pytest.raises(UserError, match="cannot download"):
        ensure_weights(spec)
    assert _cache_listing(spec) == []


def test_offline_error_says_how_to_install_by_hand(monkeypatch):
    monkeypatch.setenv("SSLMEDSAM2_MIRROR", "http://127.0.0.1:9/")
    spec = get_model("medsam2")
    with pytest.raises(UserError) as err:
        ensure_weights(spec, timeout=5)
    message = str(err.value)
    assert "by hand" in message and spec.sha256 in message and str(cached_path(spec)) in message and "--checkpoint" in message


def test_models_command_lists_cache_state(server, capsys):
    ensure_weights(_spec())  # 1 MiB stand-in: not the real size, so the listing must not call it cached
    assert main(["models", "--json"]) == 0
    import json

    listing = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listing["models"]] == ["sam2.1-tiny", "sam2.1-small", "sam2.1-base-plus", "sam2.1-large", "medsam2"]
    assert not any(m["cached"] for m in listing["models"])
    assert main(["models"]) == 0
    assert "not downloaded" in capsys.readouterr().out
