"""The agent daemon as the tests run it, on its own thread in the test process.

``build_agent(url, device, generator, log_path, ...)`` makes an :class:`Agent` with the short
reconnect delay and tick that keep tests fast, its query log at ``log_path``.
``running_agent(...)`` (same arguments) starts it, returns it once it is connected and
subscribed, and stops and joins it when the block ends, also when the test fails.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tensorslm.agent.broker_config import BrokerConfig, MqttProtocol
from tensorslm.agent.daemon import Agent
from tensorslm.agent.generation import Generator
from tensorslm.agent.query_log import QueryLog

READY_S = 10.0   # connect and subscribe to a loopback broker
JOIN_S = 20.0    # finish the queries it holds and publish "offline"


def build_agent(broker_url: str, device: str, generator: Generator, log_path: Path | str, *,
                protocol: MqttProtocol = MqttProtocol.V5, client_id: str | None = None,
                tick_s: float = 0.05, **options: Any) -> Agent:
    """An agent for ``device`` serving ``generator`` through the broker at ``broker_url``;
    ``options`` are :class:`Agent`'s other keywords (group, meter, controller, actuator,
    serving, notifier)."""
    broker = BrokerConfig.from_url(broker_url, protocol=protocol, client_id=client_id)
    return Agent(device=device, broker=broker, generator=generator,
                 query_log=QueryLog(log_path, device), reconnect_delay=(0.1, 0.5), tick_s=tick_s,
                 **options)


@contextmanager
def running_agent(broker_url: str, device: str, generator: Generator, log_path: Path | str,
                  **options: Any) -> Iterator[Agent]:
    """:func:`build_agent`'s agent, started and ready to serve; stopped and joined on exit."""
    agent = build_agent(broker_url, device, generator, log_path, **options).start()
    try:
        if not agent.ready.wait(READY_S):
            raise AssertionError(f"agent {device} did not connect to {broker_url} and subscribe "
                                 f"within {READY_S:g} s")
        yield agent
    finally:
        agent.stop()
        agent.join(JOIN_S)
