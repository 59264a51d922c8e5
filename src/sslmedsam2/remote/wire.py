"""How arrays travel between client and server: C-order bytes, zlib-compressed, base64 text in JSON.

numpy and the standard library only (and python-isal where installed): the client (3D Slicer, a cluster job)
imports this without torch.
"""

from __future__ import annotations

import base64
import binascii
import zlib

import numpy as np

from sslmedsam2.errors import UserError
from sslmedsam2.zlib_streams import zlib_module as compressing  # a 512x512x300 label map: 10 ms, not 150-290

# Every answer names the server process that gave it: a client tells a restarted server by a new value.
INSTANCE_HEADER = "X-SSLMedSAM2-Instance"
# The HTTP API's version, in /health and /info: raised with any change a client of the previous one would misread
# (an endpoint, field, value or meaning removed or changed). A client opens sessions only on its own API version.
API_VERSION = 1
# Label maps are small non-negative integers; these dtypes hold them (signed ones as some writers store labels).
LABEL_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32")


def encode_array(array: np.ndarray) -> str:
    """zlib (level 1: label maps are mostly zeros, fast beats small) and base64 of the C-order bytes."""
    return base64.b64encode(compressing.compress(np.ascontiguousarray(array).tobytes(), 1)).decode("ascii")


def decode_array(data: str, dtype: str, shape: tuple[int, ...], what: str = "array") -> np.ndarray:
    """The inverse of encode_array, refusing anything that does not decode to exactly `shape` of `dtype`: never
    more bytes than the shape needs (a small request cannot expand into a large allocation)."""
    if dtype not in LABEL_DTYPES:
        raise UserError(f"{what}: dtype {dtype!r} is not a label type; use one of {', '.join(LABEL_DTYPES)}")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        packed = base64.b64decode(data, validate=True)
        inflate = compressing.decompressobj()
        raw = inflate.decompress(packed, expected + 1)
    except (binascii.Error, ValueError, zlib.error, compressing.error) as exc:
        raise UserError(f"{what}: not zlib-compressed base64 data ({exc})") from None
    if len(raw) != expected or inflate.unconsumed_tail:
        size = "more than" if len(raw) > expected or inflate.unconsumed_tail else f"{len(raw)}, not"
        raise UserError(f"{what}: decodes to {size} {expected} bytes, the size of a {dtype} array of shape "
                        f"{tuple(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def slice_entry(index: int, plane: np.ndarray) -> dict:
    """One seed slice as the propagate request carries it."""
    plane = np.asarray(plane)
    return {"index": int(index), "dtype": plane.dtype.name, "data": encode_array(plane)}


def array_message(array: np.ndarray) -> dict:
    """A whole array (the label map in `raw` format) as JSON."""
    return {"shape": list(array.shape), "dtype": array.dtype.name, "data": encode_array(array)}


def read_array_message(message: dict, what: str = "array") -> np.ndarray:
    try:
        shape = tuple(int(v) for v in message["shape"])
        return decode_array(message["data"], message["dtype"], shape, what)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{what}: malformed array message ({exc})") from None
