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
