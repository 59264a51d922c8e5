"""ITK's morphological contour interpolation in a process of its own, kept alive between requests.

Only numpy and itk are imported here. A process that has used SimpleITK and then this `itk` filter segfaults
at exit (both packages carry their own ITK libraries), so the filter never shares a process with SimpleITK; and
loading ITK's Python wrapping takes about 10 s, so one worker serves every request of a long-lived process.

Protocol on stdin/stdout: a request is an 8-byte little-endian length and a .npy payload (a slice-first label
map); the answer is one status byte (0 ok, 1 error), a length and a .npy payload or a UTF-8 message.
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


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    warm = np.zeros((3, 4, 4), np.uint8)
    warm[0, 1:3, 1:3] = warm[2, 1:3, 1:3] = 1
    interpolate(warm)  # loads ITK's wrapping now, not on the first request
    write_frame(answers, b"ready", status=0)
    while True:
        try:
            size = _LENGTH.unpack(read_exactly(requests, _LENGTH.size))[0]
        except EOFError:
            return
        try:
            answer = array_bytes(interpolate(bytes_array(read_exactly(requests, size))))
            write_frame(answers, answer, status=0)
        except Exception as exc:  # one bad request must not end the worker
            write_frame(answers, f"{type(exc).__name__}: {exc}".encode(), status=1)


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
