"""The agent as a real process: SIGTERM mid-query (finishes what it holds, publishes offline,
exits 0) and kill -9 mid-query then restart (the query is in the log, marked failed and
answered as interrupted; nothing silently gone). Generation sleeps per token here: these
tests are about the plumbing, not the model."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tensorslm.agent.client import AskClient, mqtt_client
from tensorslm.agent.broker_config import BrokerConfig
from tensorslm.agent.protocol import MessageType
from tensorslm.agent.query_log import QueryLog
from tensorslm.agent.topics import Topics
from tests.agents import agent_process

pytestmark = pytest.mark.timeout(120)


def start_agent(tmp_path: Path, broker, per_token: float, env: dict | None = None
                ) -> subprocess.Popen:
    return agent_process(tmp_path, broker.url, "pi-09", tmp_path / "queries.db",
                         per_token_s=per_token,
                         serving={"max_new_tokens": 8, "telemetry_interval_s": 1}, env=env)


class StatusWatcher:
    def __init__(self, broker) -> None:
        self.values: list[bytes] = []
        self.changed = threading.Condition()
        self.client = mqtt_client(BrokerConfig.from_url(broker.url), "status-watcher")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(Topics().status("pi-09"), qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        with self.changed:
            self.values.append(msg.payload)
            self.changed.notify_all()

    def wait_for(self, value: bytes, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.values and self.values[-1] == value,
                                         timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_sigterm_mid_query_finishes_queued_work_then_goes_offline(mosquitto, tmp_path):
    notify_path = Path(f"/tmp/tslm-notify-{os.getpid()}-{time.monotonic_ns()}")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    watcher = StatusWatcher(mosquitto)
    proc = start_agent(tmp_path, mosquitto, per_token=0.05,
                       env={"NOTIFY_SOCKET": str(notify_path)})
    try:
        assert notify.recv(4096).decode().startswith("READY=1")
        assert watcher.wait_for(b"online", 10)
        with AskClient(BrokerConfig.from_url(mosquitto.url)) as client:
            first_token = threading.Event()
            running = client.send({"prompt": "hello", "stream": True, "max_new_tokens": 12},
                                  device="pi-09", on_message=lambda m: first_token.set())
            queued = client.send({"prompt": "hello world", "max_new_tokens": 4}, device="pi-09")
            assert first_token.wait(20)
            proc.send_signal(signal.SIGTERM)
            answers = [client.wait(running, 20), client.wait(queued, 20)]
        assert proc.wait(20) == 0
        assert watcher.wait_for(b"offline", 5)
        messages = []
        notify.settimeout(0.2)
        try:
            while True:
                messages.append(notify.recv(4096).decode())
        except socket.timeout:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
        notify.close()
        notify_path.unlink(missing_ok=True)
    assert [a.ok for a in answers] == [True, True]
    assert answers[0].body["output_tokens"] == 12
    assert any(m.startswith("STOPPING=1") for m in messages)
    log = QueryLog(tmp_path / "queries.db", "pi-09")
    rows = {r["request_id"]: r for r in log.queries()}
    assert {rid: r["outcome"] for rid, r in rows.items()} == {running: "ok", queued: "ok"}
    assert all(r["sent"] == 1 for r in rows.values())   # the outbox was flushed before exit
    log.close()


def test_kill_9_mid_query_then_restart_marks_it_failed_and_answers(mosquitto, tmp_path):
    watcher = StatusWatcher(mosquitto)
    proc = start_agent(tmp_path, mosquitto, per_token=0.1)
    try:
        assert watcher.wait_for(b"online", 30)
        with AskClient(BrokerConfig.from_url(mosquitto.url)) as client:
            done = client.ask("hello", device="pi-09", max_new_tokens=2, timeout=20)
            first_token = threading.Event()
            victim = client.send({"prompt": "hello", "stream": True, "max_new_tokens": 40},
                                 device="pi-09", on_message=lambda m: first_token.set())
            assert first_token.wait(20)
            proc.kill()
            proc.wait(10)
            # the will says offline; the accepted query is in the log, in flight
            assert watcher.wait_for(b"offline", 10)
            log = QueryLog(tmp_path / "queries.db", "pi-09")
            assert log.query(victim)["outcome"] == "accepted"
            assert log.query(done.request_id)["outcome"] == "ok"
            log.close()

            proc = start_agent(tmp_path, mosquitto, per_token=0.1)
            answer = client.wait(victim, 30)
            assert watcher.wait_for(b"online", 10)
        assert answer.final.type is MessageType.ERROR
        assert answer.body["code"] == "interrupted"
        log = QueryLog(tmp_path / "queries.db", "pi-09")
        row = log.query(victim)
        assert (row["outcome"], row["error_code"]) == ("failed", "interrupted")
        assert row["finished_at"] >= row["received_at"]
        assert [r["outcome"] for r in log.queries()].count("accepted") == 0
        log.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        watcher.close()
