"""A fake fleet for the collector and dashboard tests: records shaped like an agent's.

:func:`simulate_device` models one Pi serving queries on a battery: the battery drains with
the energy of each query plus an idle draw, the energy policy steps down the operating point
as the battery falls (a switch record each time), and a query's energy and latency follow
from its tokens and the point's per-token cost. :class:`OutboxDevice` publishes those records
with the agent's own query log and outbox.
"""
from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from tensorslm.agent.broker_config import BrokerConfig
from tensorslm.agent.client import connect_async, mqtt_client
from tensorslm.agent.outbox import Outbox
from tensorslm.agent.protocol import Outcome
from tensorslm.agent.query_log import QueryLog
from tensorslm.agent.topics import Topics
from tests.wait import wait_until

# name, rung, seconds per generated token, watts while serving, battery level to enter it.
POINTS = (
    ("full", "full", 0.066, 4.6, 60.0),
    ("balanced", "r64", 0.060, 3.9, 35.0),
    ("saver", "r16", 0.052, 3.1, 0.0),
)
BATTERY_WH = 1.0          # a small battery so that a few dozen queries cross the thresholds
IDLE_WATTS = 2.2


@dataclass
class FakeDevice:
    device: str
    queries: list[dict[str, Any]] = field(default_factory=list)
    switches: list[dict[str, Any]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)

    def messages(self) -> list[dict[str, Any]]:
        """Records in the order the agent would publish them, as record payloads."""
        items = [(r["finished_at"] or r["received_at"], {"kind": "query", "record": r})
                 for r in self.queries]
        items += [(s["time"], {"kind": "switch", "record": s}) for s in self.switches]
        return [payload for _, payload in sorted(items, key=lambda item: item[0])]


def _point_for(battery: float) -> tuple[str, str, float, float, float]:
    for point in POINTS:
        if battery >= point[4]:
            return point
    return POINTS[-1]


def simulate_device(device: str, *, queries: int = 40, start: float | None = None,
                    battery: float = 95.0, seed: int = 0, gap_s: float = 20.0) -> FakeDevice:
    """``queries`` queries of one device, one every ``gap_s`` seconds or so."""
    rng = random.Random(f"{device}-{seed}")
    now = start if start is not None else time.time() - queries * gap_s
    fake = FakeDevice(device)
    point = _point_for(battery)
    for index in range(queries):
        new_point = _point_for(battery)
        if new_point[0] != point[0]:
            fake.switches.append({
                "device": device, "switch_id": f"{device}-sw{len(fake.switches) + 1}",
                "time": now, "from_point": point[0], "to_point": new_point[0],
                "reason": f"battery {battery:.0f}% below {point[4]:.0f}%",
                "battery_percent": round(battery, 2), "watts": new_point[3]})
            point = new_point
        name, rung, s_per_token, watts, _ = point
        prompt_tokens = rng.randint(8, 60)
        output_tokens = rng.randint(12, 64)
        outcome = "ok" if rng.random() > 0.05 else "error"
        ttft = 0.04 + prompt_tokens * 0.004 * rng.uniform(0.9, 1.1)
        latency = ttft + output_tokens * s_per_token * rng.uniform(0.9, 1.15)
        if outcome != "ok":
            output_tokens, latency = 0, ttft
        energy = watts * latency
        received = now
        started = received + rng.uniform(0.001, 0.05)
        finished = started + latency
        before = battery
        battery = max(0.0, battery - (energy + IDLE_WATTS * gap_s) / (BATTERY_WH * 3600) * 100)
        fake.queries.append({
            "device": device, "request_id": f"{device}-q{index:04d}",
            "received_at": received, "started_at": started, "finished_at": finished,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "latency_s": round(latency, 4), "ttft_s": round(ttft, 4),
            "energy_j": round(energy, 4), "energy_method": "simulated",
            "energy_uncertainty_j": round(energy * 0.05, 4), "mean_watts": watts,
            "operating_point": name, "rung": rung,
            "battery_start": round(before, 3), "battery_end": round(battery, 3),
            "outcome": outcome, "error_code": None if outcome == "ok" else "generation_failed"})
        if index % 5 == 0:
            fake.telemetry.append({
                "time": finished, "battery_percent": round(battery, 3), "watts": watts,
                "operating_point": name, "rung": rung, "queue_depth": rng.randint(0, 3),
                "model": "SmolLM2-135M"})
        now = finished + gap_s * rng.uniform(0.5, 1.5)
    return fake


def simulate_fleet(devices: int = 3, queries: int = 40, seed: int = 0) -> list[FakeDevice]:
    return [simulate_device(f"pi-{i + 1:02d}", queries=queries, seed=seed,
                            battery=95.0 - 12 * i) for i in range(devices)]


class OutboxDevice:
    """One device's records published by the agent's own parts: each record is written into a
    real :class:`~tensorslm.agent.query_log.QueryLog` (a file in ``folder``) and drained by the
    real :class:`~tensorslm.agent.outbox.Outbox` over a client from the agent's factory, so a
    row counts as sent only after the broker's PUBACK and unsent rows go out again after a
    reconnect. Birth and will status are retained, as the daemon's are.

    ``broker`` is anything with ``host`` and ``port`` (tests.brokers.Broker)."""

    def __init__(self, broker: Any, device: str, folder: Path, *,
                 prefix: str = "tensorslm") -> None:
        self.topics = Topics(prefix)
        self.device = device
        self.log = QueryLog(Path(folder) / f"{device}-queries.db", device)
        config = BrokerConfig(host=broker.host, port=broker.port, keepalive_s=5,
                              client_id=f"agent-{device}")
        self.client = mqtt_client(config, reconnect_delay=(0.1, 0.5))
        self.client.will_set(self.topics.status(device), b"offline", qos=1, retain=True)
        self.outbox = Outbox(self.log, self.client, self.topics.records(device))
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self.connected.clear()
        self.client.on_publish = lambda c, u, mid, reason, props: self.outbox.on_publish(mid)
        connect_async(self.client, config)
        self.client.loop_start()
        self._drainer = threading.Thread(target=self._drain_loop, name=f"outbox-{device}",
                                         daemon=True)
        self._drainer.start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if not reason_code.is_failure:
            client.publish(self.topics.status(self.device), b"online", qos=1, retain=True)
            self.connected.set()

    def _drain_loop(self) -> None:
        while not self._stopping.wait(0.02):
            if self.connected.is_set():
                self.outbox.drain()

    def add(self, message: dict[str, Any]) -> None:
        """Log one ``{"kind": ..., "record": ...}`` message of :func:`simulate_device` the way
        the daemon does: a query accepted then finished, a switch recorded."""
        record = message["record"]
        if message["kind"] == "query":
            fields = {k: v for k, v in record.items()
                      if k not in ("device", "request_id", "received_at", "outcome")}
            self.log.accept(record["request_id"], record["received_at"], None)
            self.log.finish(record["request_id"], Outcome(record["outcome"]), **fields)
        else:
            self.log.record_switch(time=record["time"], from_point=record["from_point"],
                                   to_point=record["to_point"], reason=record["reason"],
                                   battery_percent=record["battery_percent"],
                                   watts=record["watts"])

    def resend(self, request_id: str) -> None:
        """The broker's acknowledgement of this query's row was lost: the row is unsent again."""
        self.log.db.execute("UPDATE queries SET sent = 0 WHERE request_id = ?", [request_id])

    def publish_telemetry(self, telemetry: dict[str, Any]) -> None:
        self.client.publish(self.topics.telemetry(self.device), json.dumps(telemetry), qos=1,
                            retain=True)

    def publish_raw(self, payload: bytes | str, topic: str | None = None) -> None:
        self.client.publish(topic or self.topics.records(self.device), payload, qos=1)

    def wait_all_sent(self, timeout: float = 20.0) -> None:
        wait_until(lambda: self.log.unsent_count() == 0 and self.outbox.in_flight == 0, timeout,
                   f"{self.device}: every row acknowledged by the broker "
                   f"({self.log.unsent_count()} unsent when the wait began)")

    def stop(self, *, graceful: bool = True) -> None:
        self._stopping.set()
        self._drainer.join(5)
        if graceful and self.connected.is_set():
            info = self.client.publish(self.topics.status(self.device), b"offline", qos=1,
                                       retain=True)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                info.wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()
        self.log.close()
