"""Compressed voxel data, inflated no further than its header declares: a small file cannot fill the memory (a
gzip bomb), and a stream that ends early or fails its checksum is refused instead of read as zeros."""

from __future__ import annotations

import bz2
import zlib
from collections.abc import Callable, Iterator

from sslmedsam2.errors import UserError
from sslmedsam2.zlib_streams import zlib_module as inflating  # ISA-L where installed: 2 to 3 times faster

# Inflated at a time. The compressed input goes in a slice at a time (zlib copies an unconsumed tail on every
# call: keep it short).
_PIECE = 1 << 20
_INPUT = 1 << 18
# Deflate cannot inflate more than 1032 bytes per compressed byte: a header declaring more is not this file's.
DEFLATE_MAX_RATIO = 1032
ENCODINGS = ("gzip", "zlib", "bzip2")


def _zlib_pieces(raw: bytes | memoryview, wbits: int, members: bool) -> Iterator[bytes]:
    """The inflated bytes of a zlib or gzip stream (several gzip members when `members`), a piece of at most
    _PIECE bytes at a time; EOFError for a stream that ends early (zlib checks each member's checksum)."""
    view, start = memoryview(raw), 0
    while start < len(view):
        inflater = inflating.decompressobj(wbits)
        while not inflater.eof and start < len(view):
            data = view[start:start + _INPUT]
            start += len(data)
            while True:
                piece = inflater.decompress(data, _PIECE)
                data = inflater.unconsumed_tail
                if piece:
                    yield piece
                elif not data:
                    break
        if not inflater.eof:
            raise EOFError("the compressed stream ends early")
        if not members:
            return
        start -= len(inflater.unused_data)  # the next member starts there, after NUL padding
        while start < len(view) and view[start] == 0:
            start += 1


def _gzip_pieces(raw: bytes | memoryview) -> Iterator[bytes]:
    return _zlib_pieces(raw, 16 + zlib.MAX_WBITS, members=True)


def _bzip2_pieces(raw: bytes | memoryview) -> Iterator[bytes]:
    view, start = memoryview(raw), 0
    inflater = bz2.BZ2Decompressor()
    while True:
        if inflater.needs_input:
            if start >= len(view):
                break
            data, start = view[start:start + _INPUT], start + _INPUT
        else:
            data = b""
        piece = inflater.decompress(data, _PIECE)
        if piece:
            yield piece
        if inflater.eof:
            return
    raise EOFError("the compressed stream ends early")


def pieces(raw: bytes | memoryview, encoding: str) -> Iterator[bytes]:
    """Inflated pieces of `raw` in `encoding` (gzip, zlib or bzip2)."""
    if encoding == "gzip":
        return _gzip_pieces(raw)
    if encoding == "zlib":
        return _zlib_pieces(raw, zlib.MAX_WBITS, members=False)
    if encoding == "bzip2":
        return _bzip2_pieces(raw)
    raise ValueError(f"unknown encoding {encoding!r}")


def inflate(raw: bytes | memoryview, encoding: str, limit: int | Callable[[bytes], int], what: str,
            head: int = 0) -> bytes:
    """The whole inflated stream, refused (UserError naming `what`) when it is damaged, incomplete, or inflates
    past `limit` bytes (stopped just after: never more than a piece beyond). `limit` may be a function of the
    first `head` inflated bytes (a header that declares the size of what follows)."""
    out, total = [], 0
    try:
        for piece in pieces(raw, encoding):
            total += len(piece)
            if callable(limit) and total >= head:
                out.append(piece)
                limit = limit(b"".join(out)[:head])
                out = [b"".join(out)]
                piece = b""
            if not callable(limit) and total > limit:
                raise UserError(f"{what}: not a readable image: it decompresses to more than its header declares "
                                f"({limit} bytes)")
            if piece:
                out.append(piece)
    except (EOFError, OSError, ValueError, zlib.error, inflating.error) as exc:
        raise UserError(f"{what}: not a readable image: damaged or incomplete compressed data ({exc}); "
                        "copy it again") from None
    if callable(limit):  # shorter than `head`: the header's own checks still apply
        limit(b"".join(out))
    return b"".join(out)


def check_ratio(declared: int, compressed: int, encoding: str, what: str) -> None:
    """A deflate stream cannot hold more than DEFLATE_MAX_RATIO times its size: refuse such a header at once."""
    if encoding in ("gzip", "zlib") and declared > DEFLATE_MAX_RATIO * compressed + _PIECE:
        raise UserError(f"{what}: not a readable image: its header declares {declared} bytes of voxels, more than "
                        f"{compressed} compressed bytes can hold")
