"""An MQTT broker inside the process, for the demo and for machines with no broker yet.

amqtt runs on its own asyncio loop in a daemon thread. It speaks MQTT 3.1.1 only, so clients
of an embedded broker use the in-payload reply address (``reply_to`` and ``id``) rather than
MQTT 5 Response Topic / Correlation Data, and no shared subscriptions; a fleet uses mosquitto.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading

from tensorslm.agent.errors import AgentError

log = logging.getLogger(__name__)


class BrokerStartError(AgentError, OSError):
    """The embedded broker could not start (port taken, amqtt missing, ...)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """``with EmbeddedBroker() as broker: ... broker.url`` — anonymous, loopback only."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        try:
            from amqtt.broker import Broker
        except ImportError as exc:  # pragma: no cover - amqtt is a core dependency
            raise BrokerStartError("the embedded broker needs amqtt: pip install amqtt") from exc
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = Broker(config, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported to the starting thread below
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="embedded-mqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerStartError(f"embedded broker did not start within {timeout}s")
        if self._error is not None:
            raise BrokerStartError(
                f"embedded broker could not listen on {self.host}:{self.port}: {self._error}"
            ) from self._error
        log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) listening on %s", self.url)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(timeout)
        except Exception:  # shutting down anyway; a failed shutdown must not hide the demo's result
            log.warning("embedded broker shutdown raised", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._broker = None
        self._loop = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
