"""zlib streams (gzip files, the server's wire format) through Intel ISA-L (python-isal) where it is installed:
the same format and checks, several times faster; the standard library's zlib elsewhere (a platform without its
wheel). Nothing else is imported: the server's client (3D Slicer, a cluster job) uses it too."""

from __future__ import annotations

import zlib

try:
    from isal import isal_zlib as zlib_module
except ImportError:
    zlib_module = zlib
