"""The one polling helper of the tests: wait for a condition that another thread, process or
broker makes true, and fail with what was awaited."""
from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], object], timeout: float = 15.0, what: str = "", *,
               interval: float = 0.05, details: Callable[[], str] | None = None) -> None:
    """Return as soon as ``condition()`` is true; raise AssertionError naming ``what`` (and
    ``details()``, e.g. the logs of the processes involved) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:g} s waiting for {what or condition}"
            raise AssertionError(message + (f"\n{details()}" if details is not None else ""))
        time.sleep(interval)
