"""A fleet on one machine: the shipped broker configuration (TLS, accounts, ACL), the collector
(``tensorslm collect``) and three agents, each a separate process.

The agents run the real daemon with a stub generator behind the Generator interface (a fixed
time per token, no model): this test is about the fleet plumbing. A client sends a stream of
prompts to the group's shared request topic; the broker balances them over the agents; one
agent is killed with SIGKILL mid-run and restarted, as systemd's Restart=on-failure would.
Every prompt an agent accepted is answered exactly once (or answered as failed), and the
central database ends up with every query of every agent's log.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tensorslm.agent.client import AskClient
from tensorslm.agent.broker_config import BrokerConfig, TlsConfig
from tensorslm.agent.protocol import MessageType
from tests.brokers import MOSQUITTO, Broker, free_port, wait_for_port
from tests.test_broker_security import render_config, run_helper
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[1]
TENSORSLM = Path(sys.executable).parent / "tensorslm"
DEVICES = ("pi-01", "pi-02", "pi-03")
GROUP = "lab"
PROMPTS = 36
PER_TOKEN_S = 0.06   # 0.36 s a query, slower than prompts arrive: queues build up
MAX_NEW_TOKENS = 6

AGENT = textwrap.dedent("""
    import logging, sys, time
    sys.path.insert(0, {root!r})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s {device} %(name)s: %(message)s")
    from tensorslm.agent.config import ServingConfig
    from tensorslm.agent.broker_config import BrokerConfig, TlsConfig
    from tensorslm.agent.daemon import Agent, run_until_signalled
    from tensorslm.agent.generation import GenerationResult
    from tensorslm.agent.query_log import QueryLog
    from tests.tiny_model import CpuTimeMeter

    class StubGenerator:
        \"\"\"The Generator interface without a model: words of the prompt, a fixed time each.\"\"\"
        model_ref, embedding, max_prompt_tokens, rung = "stub", None, 1024, None
        precision, precisions = "fp32", ["fp32"]

        def set_precision(self, precision):
            if precision not in self.precisions:
                raise ValueError(f"precision {{precision}} is not resident")

        def generate(self, request, *, max_new_tokens, on_token=None, stop=None):
            t0 = time.perf_counter()
            words = (request.prompt or "").split() or ["..."]
            out, ttft = [], None
            for i in range(max_new_tokens):
                if stop is not None and stop.is_set():
                    break
                time.sleep({per_token})
                token = " " + words[i % len(words)]
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                out.append(token)
                if on_token is not None:
                    on_token(token)
            return GenerationResult("".join(out), len(words), len(out), ttft,
                                    time.perf_counter() - t0)

    broker = BrokerConfig.from_url({url!r}, tls=TlsConfig(ca_file={ca!r}), username={device!r},
                                   password={password!r}, client_id="tensorslm-agent-{device}",
                                   reconnect_min_s=0.1, reconnect_max_s=0.5)
    agent = Agent(device={device!r}, group={group!r}, broker=broker, generator=StubGenerator(),
                  query_log=QueryLog({db!r}, {device!r}), meter=CpuTimeMeter(),
                  serving=ServingConfig(queue_size=64, max_new_tokens={max_new}, telemetry_interval_s=1),
                  reconnect_delay=(0.1, 0.5), tick_s=0.05)
    run_until_signalled(agent)
""")


class Fleet:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: dict[str, subprocess.Popen] = {}
        self.passwords = {name: f"pw-{name}" for name in (*DEVICES, "collector", "alice")}
        for device in DEVICES:
            run_helper(base, "device", device, GROUP, password=self.passwords[device])
        run_helper(base, "collector", "collector", password=self.passwords["collector"])
        run_helper(base, "client", "alice", password=self.passwords["alice"])
        run_helper(base, "test-certs", "localhost")
        port, self.tls_port = free_port(), free_port()
        self.broker = Broker.start(base / "run", config_lines=render_config(base, port, self.tls_port),
                                   port=port)
        wait_for_port("127.0.0.1", self.tls_port)
        self.url = f"mqtts://localhost:{self.tls_port}"
        self.ca = base / "certs" / "ca.crt"
        self.central = base / "central.db"

    def start_collector(self) -> None:
        config = self.base / "collector.yaml"
        config.write_text(yaml.safe_dump({
            "broker": {"url": self.url, "client_id": "tensorslm-collector", "username": "collector",
                       "password": self.passwords["collector"], "tls": {"ca_file": str(self.ca)},
                       "reconnect_min_s": 0.1, "reconnect_max_s": 1},
            "database": str(self.central)}))
        self._spawn("collector", [str(TENSORSLM), "-v", "collect", "--config", str(config)])

    def start_agent(self, device: str) -> None:
        script = self.base / f"{device}.py"
        script.write_text(AGENT.format(root=str(ROOT), url=self.url, ca=str(self.ca), device=device,
                                       password=self.passwords[device], group=GROUP,
                                       db=str(self.local_log(device)), per_token=PER_TOKEN_S,
                                       max_new=MAX_NEW_TOKENS))
        self._spawn(device, [sys.executable, str(script)])

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.base / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.base,
                                            env={**os.environ, "PYTHONPATH": str(ROOT)})
        log.close()

    def local_log(self, device: str) -> Path:
        return self.base / f"{device}-queries.db"

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.broker.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.base.glob("*.log")))

    def client(self) -> AskClient:
        broker = BrokerConfig.from_url(self.url, tls=TlsConfig(ca_file=self.ca), username="alice",
                                       password=self.passwords["alice"])
        return AskClient(broker, connect_timeout=20)


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute(sql).fetchall()


def online(fleet: Fleet) -> set[str]:
    if not fleet.central.exists():
        return set()
    try:
        return {d for d, s in rows(fleet.central, "SELECT device, status FROM devices") if s == "online"}
    except sqlite3.OperationalError:   # the collector is still creating its schema
        return set()


@pytest.fixture
def fleet():
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed; `make test` installs the Debian package")
    # The broker drops to the mosquitto user before reading its password file: a world-readable
    # directory, not pytest's tmp_path (0700).
    base = Path(tempfile.mkdtemp(prefix="tensorslm-fleet-"))
    base.chmod(0o755)
    (base / "data").mkdir(mode=0o777)
    (base / "data").chmod(0o777)
    fleet = Fleet(base)
    try:
        yield fleet
    finally:
        fleet.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_fleet_balances_survives_a_killed_agent_and_collects_everything(fleet):
    fleet.start_collector()
    for device in DEVICES:
        fleet.start_agent(device)
    wait_until(lambda: online(fleet) == set(DEVICES), 60, "three agents online at the collector",
               interval=0.2, details=fleet.logs)

    victim = "pi-02"
    with fleet.client() as client:
        sent: list[str] = []
        finals: Counter = Counter()
        done = threading.Condition()

        def count(message) -> None:
            if message.final:
                with done:
                    finals[message.id] += 1
                    done.notify_all()

        killed_after = None
        for i in range(PROMPTS):
            sent.append(client.send({"prompt": f"prompt {i} for the lab fleet",
                                     "max_new_tokens": MAX_NEW_TOKENS},
                                    group=GROUP, on_message=count))
            time.sleep(0.08)
            if killed_after is None and i >= PROMPTS // 3:
                in_hand = rows(fleet.local_log(victim),
                               "SELECT count(*) FROM queries WHERE outcome = 'accepted'")[0][0]
                if in_hand >= 2:   # mid-query, with more queued behind
                    fleet.kill(victim)
                    killed_after = i
        assert killed_after is not None, f"{victim} never had two prompts in hand\n{fleet.logs()}"
        # systemd's Restart=on-failure: the agent comes back and answers what it had accepted.
        fleet.start_agent(victim)

        accepted = {}
        for device in DEVICES:
            wait_until(lambda: not rows(fleet.local_log(device),
                                        "SELECT 1 FROM queries WHERE outcome = 'accepted'"),
                       60, f"{device} to finish or fail every accepted query", interval=0.2,
                       details=fleet.logs)
            for request_id, outcome, error_code in rows(
                    fleet.local_log(device), "SELECT request_id, outcome, error_code FROM queries"):
                assert request_id not in accepted, f"{request_id} accepted twice"
                accepted[request_id] = (device, outcome, error_code)

        with done:
            done.wait_for(lambda: all(finals[r] >= 1 for r in accepted), timeout=60)
        time.sleep(0.5)   # a duplicate answer would arrive now
        answers = {r: [m for m in client.messages(r) if m.final] for r in sent}

    # Every accepted prompt: exactly one final answer, ok or failed as interrupted.
    for request_id, (device, outcome, error_code) in accepted.items():
        assert finals[request_id] == 1, (request_id, device, outcome, answers.get(request_id))
        message = answers[request_id][0]
        if outcome == "ok":
            assert message.type is MessageType.REPLY and message.body["device"] == device
        else:
            assert (device, outcome, error_code) == (victim, "failed", "interrupted")
            assert message.type is MessageType.ERROR
    # Prompts nobody accepted (in flight to the killed agent's discarded session) get no
    # answer at all, never a wrong one; there are few of them.
    unaccepted = [r for r in sent if r not in accepted]
    assert all(finals[r] == 0 for r in unaccepted)
    assert len(unaccepted) <= 3, (unaccepted, fleet.logs())

    # Balanced: every agent served prompts; the victim was interrupted with work in hand.
    by_device = Counter(device for device, outcome, _ in accepted.values() if outcome == "ok")
    assert set(by_device) == set(DEVICES) and min(by_device.values()) >= 2, by_device
    assert Counter(outcome for _, outcome, _ in accepted.values())["ok"] >= PROMPTS - 10
    failed = sum(1 for _, outcome, _ in accepted.values() if outcome == "failed")
    assert failed >= 2   # what the victim held when it was killed, answered as interrupted
    print(f"fleet: {len(sent)} prompts, ok by device {dict(by_device)}, {failed} failed "
          f"(interrupted on {victim}), {len(unaccepted)} never accepted")

    # The central database: every query of every agent's log, with its outcome.
    def central() -> dict[str, tuple]:
        try:
            return {r: (d, o) for d, r, o in rows(fleet.central,
                                                  "SELECT device, request_id, outcome FROM queries")}
        except sqlite3.OperationalError:
            return {}

    expected = {r: (d, o) for r, (d, o, _) in accepted.items()}
    wait_until(lambda: central() == expected, 60, "the central database to hold every query",
               interval=0.2, details=fleet.logs)
