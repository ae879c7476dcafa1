"""Home Assistant MQTT discovery: the payloads, their templates against real agent messages,
and the collector announcing a device it sees on a real broker."""
from __future__ import annotations

import json
import threading

import jinja2
import paho.mqtt.client as mqtt
import pytest

from tensorslm.fleet.ha_discovery import discovery_messages
from tensorslm.agent.topics import Topics, BadTopicName
from tests.fake_fleet import OutboxDevice, simulate_device
from tests.test_collector import make_collector
from tests.wait import wait_until


def render(template: str, payload: dict, state: str = "unknown") -> str:
    """Render a value_template the way Home Assistant does: value_json and this.state."""
    env = jinja2.Environment()
    return env.from_string(template).render(value_json=payload, this={"state": state}).strip()


def by_key(messages):
    return {m.topic.split("/")[-2].removeprefix("tensorslm_pi_04_"): m for m in messages}


def test_payloads_follow_the_topic_tree():
    messages = discovery_messages("pi-04", prefix="lab/fleet", model="SmolLM2-135M")
    topics = Topics("lab/fleet")
    entities = by_key(messages)
    assert set(entities) == {"battery", "power", "query_energy", "operating_point",
                             "queue_depth", "online"}
    assert len({m.payload["unique_id"] for m in messages}) == len(messages)
    for key, message in entities.items():
        component = "binary_sensor" if key == "online" else "sensor"
        assert message.topic == f"homeassistant/{component}/tensorslm_pi_04_{key}/config"
        assert message.payload["device"] == {
            "identifiers": ["tensorslm_pi-04"], "name": "pi-04", "manufacturer": "tensorslm",
            "model": "SmolLM2-135M"}
        assert json.loads(message.encode()) == message.payload
    battery = entities["battery"].payload
    assert (battery["state_topic"], battery["device_class"], battery["unit_of_measurement"],
            battery["state_class"]) == (topics.telemetry("pi-04"), "battery", "%", "measurement")
    assert battery["availability_topic"] == topics.status("pi-04")
    power = entities["power"].payload
    assert (power["device_class"], power["unit_of_measurement"]) == ("power", "W")
    energy = entities["query_energy"].payload
    assert energy["state_topic"] == topics.records("pi-04")
    assert energy["unit_of_measurement"] == "J" and "device_class" not in energy
    online = entities["online"].payload
    assert (online["state_topic"], online["payload_on"], online["payload_off"],
            online["device_class"]) == (topics.status("pi-04"), "online", "offline", "connectivity")


def test_templates_read_the_agents_messages():
    fake = simulate_device("pi-04", queries=40)
    entities = by_key(discovery_messages("pi-04"))
    telemetry = fake.telemetry[-1]
    assert float(render(entities["battery"].payload["value_template"], telemetry)) == \
        telemetry["battery_percent"]
    assert float(render(entities["power"].payload["value_template"], telemetry)) == telemetry["watts"]
    assert render(entities["operating_point"].payload["value_template"], telemetry) == \
        telemetry["operating_point"]

    energy = entities["query_energy"].payload["value_template"]
    answered = next(q for q in fake.queries if q["outcome"] == "ok")
    assert float(render(energy, {"kind": "query", "record": answered})) == \
        pytest.approx(answered["energy_j"], abs=1e-3)
    # A switch record or a failed query leaves the last energy in place.
    switch = {"kind": "switch", "record": fake.switches[0]}
    assert render(energy, switch, state="7.25") == "7.25"
    failed = {"kind": "query", "record": answered | {"outcome": "busy", "energy_j": None}}
    assert render(energy, failed, state="7.25") == "7.25"


@pytest.mark.parametrize("device, prefix, message", [
    ("pi 04", "homeassistant", "device id must be 1-64 letters"),
    ("pi-04", "home/+/assistant", "topic prefix level must be 1-64 letters"),
])
def test_bad_names_are_refused(device, prefix, message):
    with pytest.raises(BadTopicName, match=message):
        discovery_messages(device, discovery_prefix=prefix)


def test_collector_announces_each_device_once(mosquitto, tmp_path):
    seen: list[str] = []
    lock = threading.Lock()

    def on_message(client, userdata, message):
        json.loads(message.payload)
        with lock:
            seen.append(message.topic)

    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = on_message
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe("homeassistant/#", qos=1)
    watcher.loop_start()

    collector = make_collector(mosquitto, tmp_path / "central.db",
                               ha_discovery_prefix="homeassistant")
    agents = [OutboxDevice(mosquitto, d, tmp_path) for d in ("pi-04", "pi-05")]
    try:
        expected = {m.topic for d in ("pi-04", "pi-05") for m in discovery_messages(d)}
        wait_until(lambda: expected <= set(seen), what="discovery messages")
        agents[0].publish_telemetry(simulate_device("pi-04", queries=5).telemetry[0])
        wait_until(lambda: collector.stats.telemetry == 1, what="telemetry")
    finally:
        for agent in agents:
            agent.stop()
        collector.stop()
    watcher.loop_stop()
    watcher.disconnect()
    assert collector.announced == {"pi-04", "pi-05"}
    assert sorted(seen) == sorted(expected)   # nothing else under homeassistant/, nothing twice
    # Retained: a Home Assistant that connects later still finds the entities.
    late: list[str] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: late.append(m.topic) if m.retain else None
    client.connect(mosquitto.host, mosquitto.port)
    client.subscribe("homeassistant/#", qos=1)
    client.loop_start()
    try:
        wait_until(lambda: set(late) == expected, what="retained discovery")
    finally:
        client.loop_stop()
        client.disconnect()
