"""How much main memory the system can give now: the one probe every part of the engine asks."""

from __future__ import annotations

import os

from sslmedsam2.errors import UserError

GB = 1 << 30


def _meminfo_available() -> int | None:
    """Linux's own estimate (MemAvailable: free memory plus what the page cache can give back)."""
    try:
        with open("/proc/meminfo", "rb") as handle:
            for line in handle:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _windows_available() -> int | None:
    import ctypes

    class Status(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                    ("available", ctypes.c_ulonglong), ("total_page", ctypes.c_ulonglong),
                    ("available_page", ctypes.c_ulonglong), ("total_virtual", ctypes.c_ulonglong),
                    ("available_virtual", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]

    status = Status()
    status.length = ctypes.sizeof(Status)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.available)


def available_memory() -> int:
    """Bytes of main memory available now: MemAvailable on Linux, free pages elsewhere on POSIX, the available
    physical memory on Windows; 64 GB where the system cannot tell."""
    found = _meminfo_available()
    if found is None and os.name == "nt":
        found = _windows_available()
    if found is None:
        try:
            found = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            found = 64 * GB
    return found


def check_room(nbytes: int, what: str) -> None:
    """Refuse, before anything is allocated, work that needs more main memory than is available."""
    room = available_memory()
    if nbytes > room:
        raise UserError(f"{what}: needs {nbytes / GB:.1f} GB of memory, {room / GB:.1f} GB are available")
