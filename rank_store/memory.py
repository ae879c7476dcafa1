"""Handing freed heap memory back to the operating system.

glibc keeps pages freed by ``free`` mapped for reuse, so after a large transient (the fp32
body read while packing, the parse of a tokenizer's JSON) the resident set stays high
although nothing uses it. ``malloc_trim(0)`` returns them; on a C library without it (musl,
macOS) there is nothing to do.
"""
from __future__ import annotations

import ctypes
import ctypes.util


def return_freed_memory() -> None:
    """Return freed heap pages to the OS (a no-op where the C library cannot)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to trim
        return


#: mallopt's parameter number for the mmap threshold (glibc's M_MMAP_THRESHOLD)
_M_MMAP_THRESHOLD = -3


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more by its own memory map, returned to
    the OS the moment it is freed. glibc starts at 128 KiB but raises the threshold after the
    first large free (up to 32 MiB), so the multi-MB temporaries of loading and packing a
    model then stay on the heap: measured on SmolLM2's int8 body, a start-up peak of 737 MB
    against 566 MB with a fixed 1 MiB threshold. A no-op where the C library has no
    ``mallopt``."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        return
