"""systemd ``Type=notify`` support without a dependency: datagrams to ``$NOTIFY_SOCKET``.

``READY=1`` once serving, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` at half of
``$WATCHDOG_USEC`` (call :meth:`Notifier.watchdog_due` from the main loop so that a stuck loop
stops the pings and systemd restarts the service), ``STOPPING=1`` on shutdown. Outside
systemd (no ``NOTIFY_SOCKET``) every call does nothing.

:func:`stop_on_signals` is the one way a service (the agent, the collector) turns SIGTERM and
SIGINT into a clean stop.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from typing import Callable, Iterator, Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]   # abstract namespace
        self.address = address
        self.watchdog_interval = self._watchdog_interval(env)
        self._last_ping = 0.0

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC")
        if not usec:
            return None
        pid = env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            return None   # the watchdog is meant for another process
        try:
            value = int(usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: expected microseconds as a whole number", usec)
            return None
        return value / 2 / 1e6 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; False when not under systemd or on error."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode("utf-8"))
            return True
        except OSError as exc:
            log.warning("cannot notify systemd at %r: %s", self.address, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        self._last_ping = time.monotonic()
        return self.notify("WATCHDOG=1")

    def watchdog_due(self) -> bool:
        """Ping the watchdog if half of WATCHDOG_USEC has passed since the last ping."""
        if self.watchdog_interval is None or self.address is None:
            return False
        if time.monotonic() - self._last_ping >= self.watchdog_interval:
            return self.watchdog()
        return False


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None],
                    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
                    ) -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT call ``stop()`` (which must only set flags: it runs
    in the main thread between two bytecodes); the previous handlers come back after.
    Call from the main thread."""
    def handle(signum: int, frame: object) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        stop()

    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
