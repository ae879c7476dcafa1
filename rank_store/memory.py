"""Handing freed heap memory back to the operating system.

glibc keeps pages freed by ``free`` mapped for reuse, so after a large transient (the fp32
body read while packing, the parse of a tokenizer's JSON) the resident set stays high
although nothing uses it. ``malloc_trim(0)`` returns them; on a C library without it (musl,
macOS) there is nothing to do.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

#: mallopt's parameter number for the mmap threshold (glibc's M_MMAP_THRESHOLD)
_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> Any:
    """The C library, found once (``find_library`` runs a subprocess), or None."""
    name = ctypes.util.find_library("c")
    try:
        return None if name is None else ctypes.CDLL(name)
    except OSError:
        return None


def _call(function: str, *args: int) -> None:
    """``function(*args)`` of the C library where it has it (glibc); otherwise nothing."""
    libc = _libc()
    entry = getattr(libc, function, None) if libc is not None else None
    if entry is not None:
        entry(*args)


def return_freed_memory() -> None:
    """Return freed heap pages to the OS (a no-op where the C library cannot)."""
    _call("malloc_trim", 0)


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more by its own memory map, returned to
    the OS the moment it is freed. glibc starts at 128 KiB but raises the threshold after the
    first large free (up to 32 MiB), so the multi-MB temporaries of loading and packing a
    model would stay on the heap and raise the start-up peak (``bench/bench_memory.py``
    shows the peak per step). A no-op where the C library has no ``mallopt``."""
    _call("mallopt", _M_MMAP_THRESHOLD, threshold)
