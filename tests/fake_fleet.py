"""A fake fleet for the collector and dashboard tests: records shaped like an agent's.

:func:`simulate_device` models one Pi serving queries on a battery: the battery drains with
the energy of each query plus an idle draw, the energy policy steps down the operating point
as the battery falls (a switch record each time), and a query's energy and latency follow
from its tokens and the point's per-token cost. :class:`FakeAgent` publishes those records
over MQTT the way the agent's outbox does: QoS 1, a row counts as sent only after the broker's
PUBACK, and rows not yet acknowledged are published again after a reconnect.
"""
from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from tensorslm.agent.topics import Topics

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


class FakeAgent:
    """Publishes a device's records like the agent's outbox: QoS 1, sent only on PUBACK,
    unsent rows published again after every (re)connect. Also birth/will status and
    telemetry, retained.

    A flusher thread publishes; paho's callbacks only record acknowledgements (publishing
    from a callback, or holding our lock around ``publish``, can deadlock with paho's locks).
    """

    def __init__(self, host: str, port: int, device: str, *, prefix: str = "tensorslm") -> None:
        self.topics = Topics(prefix)
        self.device = device
        self.outbox: list[dict[str, Any]] = []      # payloads in publish order
        self.sent: set[int] = set()                 # outbox indexes acknowledged by the broker
        self._in_flight: dict[int, int] = {}        # mid -> outbox index
        self._acked_early: set[int] = set()         # PUBACKs that beat the mid's registration
        self._lock = threading.Lock()
        self._session = 0                           # bumped on every disconnect
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"agent-{device}",
                                  protocol=mqtt.MQTTv5)
        self.client.will_set(self.topics.status(device), "offline", qos=1, retain=True)
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.connect_async(host, port, keepalive=5)
        self.client.loop_start()
        self._flusher = threading.Thread(target=self._flush_loop, name=f"outbox-{device}",
                                         daemon=True)
        self._flusher.start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self.connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        with self._lock:
            self._session += 1
            self._in_flight.clear()     # unacknowledged rows go out again after reconnecting
            self._acked_early.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            index = self._in_flight.pop(mid, None)
            if index is None:
                self._acked_early.add(mid)
            elif not reason_code.is_failure:
                self.sent.add(index)

    def add(self, payload: dict[str, Any]) -> None:
        with self._lock:
            self.outbox.append(payload)

    def _flush_loop(self) -> None:
        announced = -1
        while not self._stopping.wait(0.02):
            if not self.connected.is_set():
                continue
            with self._lock:
                session = self._session
            if announced != session:
                self.client.publish(self.topics.status(self.device), "online", qos=1, retain=True)
                announced = session
            self.flush()

    def flush(self) -> None:
        """Publish every row not yet acknowledged and not already in flight."""
        with self._lock:
            waiting = set(self._in_flight.values())
            pending = [i for i in range(len(self.outbox)) if i not in self.sent and i not in waiting]
            session = self._session
        for index in pending:
            if not self.connected.is_set():
                return
            info = self.client.publish(self.topics.records(self.device),
                                       json.dumps(self.outbox[index]), qos=1)
            with self._lock:
                if session != self._session:
                    return
                if info.mid in self._acked_early:
                    self._acked_early.discard(info.mid)
                    self.sent.add(index)
                else:
                    self._in_flight[info.mid] = index

    def publish_telemetry(self, telemetry: dict[str, Any]) -> None:
        self.client.publish(self.topics.telemetry(self.device), json.dumps(telemetry), qos=1,
                            retain=True)

    def publish_raw(self, payload: bytes | str, topic: str | None = None) -> None:
        self.client.publish(topic or self.topics.records(self.device), payload, qos=1)

    def all_sent(self) -> bool:
        with self._lock:
            return len(self.sent) == len(self.outbox)

    def wait_all_sent(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.all_sent():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.device}: {len(self.outbox) - len(self.sent)} of "
                           f"{len(self.outbox)} records not acknowledged after {timeout}s")

    def stop(self, *, graceful: bool = True) -> None:
        self._stopping.set()
        self._flusher.join(5)
        if graceful and self.connected.is_set():
            info = self.client.publish(self.topics.status(self.device), "offline", qos=1,
                                       retain=True)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                info.wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()
