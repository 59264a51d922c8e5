"""ITK's morphological contour interpolation in a process of its own, kept alive between requests.

Only numpy and itk are imported here. A process that has used SimpleITK and then this `itk` filter segfaults
at exit (both packages carry their own ITK libraries), so the filter never shares a process with SimpleITK; and
loading ITK's Python wrapping takes about 10 s, so a worker serves many requests: run as a module, it is the
child of one process (requests on stdin/stdout, until stdin closes); worker_server runs the same filter for every
process of the user, on a private Unix socket.

Protocol: a request is an 8-byte little-endian length and a .npy payload (a slice-first label map, never
pickled); the answer is one status byte (0 ok, 1 error), a length and a .npy payload or a UTF-8 message.
"""

from __future__ import annotations

import io
import struct
import sys
from typing import BinaryIO

import numpy as np

_LENGTH = struct.Struct("<Q")


def write_frame(stream: BinaryIO, payload: bytes, status: int | None = None) -> None:
    head = b"" if status is None else bytes([status])
    stream.write(head + _LENGTH.pack(len(payload)) + payload)
    stream.flush()


def read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError("the stream ended")
        data += chunk
    return data


def read_frame(stream: BinaryIO) -> bytes:
    """A length-prefixed payload; EOFError when the stream ends before or inside it."""
    size = _LENGTH.unpack(read_exactly(stream, _LENGTH.size))[0]
    return read_exactly(stream, size)


def read_answer(stream: BinaryIO) -> tuple[int, bytes]:
    """A status byte and a length-prefixed payload."""
    status = read_exactly(stream, 1)[0]
    return status, read_frame(stream)


def array_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def bytes_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def interpolate(seeds_map: np.ndarray) -> np.ndarray:
    import itk

    image = itk.image_from_array(np.ascontiguousarray(seeds_map))
    # ITK index axis 2 is numpy axis 0, the slice axis of a slice-first array
    result = itk.morphological_contour_interpolator(image, axis=2)
    return np.asarray(itk.array_from_image(result)).astype(seeds_map.dtype, copy=False)


def warm_up() -> None:
    """Load ITK's wrapping now (the 10 s), not on the first request."""
    warm = np.zeros((3, 4, 4), np.uint8)
    warm[0, 1:3, 1:3] = warm[2, 1:3, 1:3] = 1
    interpolate(warm)


def answer(payload: bytes) -> tuple[bytes, int]:
    """The answer to one request and its status; a bad request is answered with its error, not a dead worker."""
    try:
        return array_bytes(interpolate(bytes_array(payload))), 0
    except Exception as exc:  # one bad request must not end the worker
        return f"{type(exc).__name__}: {exc}".encode(), 1


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """The child worker: a "ready" answer once ITK is loaded, then one answer per request until stdin closes."""
    warm_up()
    write_frame(answers, b"ready", status=0)
    while True:
        try:
            payload = read_frame(requests)
        except EOFError:
            return
        data, status = answer(payload)
        write_frame(answers, data, status=status)


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
