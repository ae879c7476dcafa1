"""The agent daemon as the tests run it: on a thread of the test process, or in a process of
its own.

``build_agent(url, device, generator, log_path, ...)`` makes an :class:`Agent` with the short
reconnect delay and tick that keep tests fast, its query log at ``log_path``.
``running_agent(...)`` (same arguments) starts it, returns it once it is connected and
subscribed, and stops and joins it when the block ends, also when the test fails.
``agent_process(...)`` runs one on the tiny model in a child process, as systemd does, for the
tests that signal or kill it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tensorslm.agent.broker_config import BrokerConfig, MqttProtocol
from tensorslm.agent.daemon import Agent
from tensorslm.agent.generation import Generator
from tensorslm.agent.query_log import QueryLog

ROOT = Path(__file__).resolve().parents[1]
READY_S = 10.0   # connect and subscribe to a loopback broker
JOIN_S = 20.0    # finish the queries it holds and publish "offline"

AGENT_PROCESS = textwrap.dedent("""
    import logging, sys
    sys.path.insert(0, {root!r})
    logging.basicConfig(level=logging.INFO)
    from tensorslm.agent.config import ServingConfig
    from tensorslm.agent.daemon import run_until_signalled
    from tensorslm.agent.generation import HFGenerator
    from tests.agents import build_agent
    from tests.tiny_model import CpuTimeMeter, SlowGenerator, tiny_model

    model, tokenizer = tiny_model()
    generator = SlowGenerator(HFGenerator(model, tokenizer), {per_token_s!r})
    agent = build_agent({url!r}, {device!r}, generator, {log_path!r},
                        client_id={client_id!r}, meter=CpuTimeMeter(),
                        serving=ServingConfig(**{serving!r}))
    run_until_signalled(agent)
""")


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


def agent_process(workdir: Path, broker_url: str, device: str, log_path: Path, *,
                  per_token_s: float, serving: dict[str, Any], env: dict[str, str] | None = None
                  ) -> subprocess.Popen:
    """The agent of ``device`` in a child process that serves the tiny model, sleeping
    ``per_token_s`` per token, with ``ServingConfig(**serving)``, until SIGTERM
    (:func:`run_until_signalled`); its output is appended to ``workdir / "agent.log"``."""
    script = workdir / "agent_child.py"
    script.write_text(AGENT_PROCESS.format(root=str(ROOT), url=broker_url, device=device,
                                           log_path=str(log_path), client_id=f"agent-{device}",
                                           per_token_s=per_token_s, serving=serving))
    with open(workdir / "agent.log", "ab") as out:
        return subprocess.Popen([sys.executable, str(script)], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
