"""Home Assistant MQTT discovery for the fleet's devices.

For each device, retained config messages under ``{discovery_prefix}/{component}/{object_id}/config``
make Home Assistant create a device with these entities, fed by the topics the agent already
publishes (no extra traffic from the Pi):

- battery (%), power (W), operating point and queue depth from the retained telemetry JSON;
- energy of the last answered query (J) from the records topic;
- connectivity (a binary sensor) from the retained status (``online``/``offline``), which is
  also every entity's availability.

The collector publishes them when it first sees a device (``home_assistant`` in
collector.yaml), so devices keep publishing only under their own prefix. An empty retained
payload on the same topics removes the entities (:func:`removal_messages`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tensorslm.agent.topics import DEFAULT_PREFIX, Topics, check_level, check_prefix

DEFAULT_DISCOVERY_PREFIX = "homeassistant"


@dataclass(frozen=True)
class DiscoveryMessage:
    topic: str
    payload: dict[str, Any]

    def encode(self) -> bytes:
        return json.dumps(self.payload, sort_keys=True).encode()


@dataclass(frozen=True)
class _Sensor:
    key: str
    name: str
    source: str                       # "telemetry" or "records"
    value_template: str
    unit: str | None = None
    device_class: str | None = None
    state_class: str | None = None
    icon: str | None = None


# A records message is {"kind": "query"|"switch", "record": {...}}; only answered queries
# carry the energy of a query, so any other message keeps the sensor's current state.
_ENERGY_TEMPLATE = ("{% if value_json.kind == 'query' and value_json.record.outcome == 'ok' "
                    "and value_json.record.energy_j is number %}"
                    "{{ value_json.record.energy_j | round(3) }}{% else %}{{ this.state }}{% endif %}")

SENSORS: tuple[_Sensor, ...] = (
    _Sensor("battery", "Battery", "telemetry", "{{ value_json.battery_percent }}", unit="%",
            device_class="battery", state_class="measurement"),
    _Sensor("power", "Power", "telemetry", "{{ value_json.watts }}", unit="W",
            device_class="power", state_class="measurement"),
    # Home Assistant's `energy` device class requires a total; a per-query figure is a
    # measurement, so it carries the unit without the class.
    _Sensor("query_energy", "Energy per query", "records", _ENERGY_TEMPLATE, unit="J",
            state_class="measurement", icon="mdi:lightning-bolt"),
    _Sensor("operating_point", "Operating point", "telemetry",
            "{{ value_json.operating_point }}", icon="mdi:tune-variant"),
    _Sensor("queue_depth", "Queue depth", "telemetry", "{{ value_json.queue_depth }}",
            state_class="measurement", icon="mdi:tray-full"),
)


def _object_id(device: str, key: str) -> str:
    return f"tensorslm_{device}_{key}".replace("-", "_")


def discovery_messages(device: str, *, prefix: str = DEFAULT_PREFIX,
                       discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX,
                       model: str | None = None) -> list[DiscoveryMessage]:
    """The retained config messages that announce ``device`` to Home Assistant."""
    check_level("device id", device)
    check_prefix(discovery_prefix)
    topics = Topics(prefix)
    device_block: dict[str, Any] = {
        "identifiers": [f"tensorslm_{device}"], "name": device, "manufacturer": "tensorslm",
        "model": model or "tensorslm agent"}
    availability = {"availability_topic": topics.status(device),
                    "payload_available": "online", "payload_not_available": "offline"}
    state_topics = {"telemetry": topics.telemetry(device), "records": topics.records(device)}
    messages: list[DiscoveryMessage] = []
    for sensor in SENSORS:
        object_id = _object_id(device, sensor.key)
        payload: dict[str, Any] = {
            "name": sensor.name, "unique_id": object_id,
            "state_topic": state_topics[sensor.source], "value_template": sensor.value_template,
            "qos": 1, "device": device_block, **availability}
        for key, value in (("unit_of_measurement", sensor.unit),
                           ("device_class", sensor.device_class),
                           ("state_class", sensor.state_class), ("icon", sensor.icon)):
            if value is not None:
                payload[key] = value
        messages.append(DiscoveryMessage(f"{discovery_prefix}/sensor/{object_id}/config", payload))
    object_id = _object_id(device, "online")
    messages.append(DiscoveryMessage(f"{discovery_prefix}/binary_sensor/{object_id}/config", {
        "name": "Online", "unique_id": object_id,
        "state_topic": topics.status(device), "payload_on": "online", "payload_off": "offline",
        "device_class": "connectivity", "entity_category": "diagnostic", "qos": 1,
        "device": device_block}))
    return messages


def removal_messages(device: str, *, discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX) -> list[str]:
    """The config topics to clear (empty retained payload) when a device leaves the fleet."""
    return [message.topic for message in discovery_messages(device,
                                                            discovery_prefix=discovery_prefix)]


def publish_discovery(client: Any, device: str, *, prefix: str = DEFAULT_PREFIX,
                      discovery_prefix: str = DEFAULT_DISCOVERY_PREFIX,
                      model: str | None = None) -> int:
    """Publish ``device``'s discovery messages (retained, QoS 1) with a paho client.
    Returns the number of messages queued."""
    messages = discovery_messages(device, prefix=prefix, discovery_prefix=discovery_prefix,
                                  model=model)
    for message in messages:
        client.publish(message.topic, message.encode(), qos=1, retain=True)
    return len(messages)
