"""The MQTT topic tree of a tensorslm fleet, in one place.

Everything lives under a configurable prefix (default ``tensorslm``)::

    {prefix}/devices/{device}/request      prompts for one device            (device reads)
    {prefix}/fleet/{group}/request         prompts for any device of a group (read as
                                           $share/{group}/{prefix}/fleet/{group}/request)
    {prefix}/devices/{device}/command      manual override, policy reload    (operator writes)
    {prefix}/devices/{device}/status       retained "online"/"offline" (birth and last will)
    {prefix}/devices/{device}/telemetry    retained JSON: battery, watts, point, queue, model
    {prefix}/devices/{device}/records      query and switch records, QoS 1   (collector reads)
    {prefix}/clients/{client}/reply/...    replies and streamed tokens        (client reads)

A device publishes only under ``{prefix}/devices/{device}/`` and to client reply topics; the
broker ACL in ``deploy/mosquitto/`` enforces it. Device ids, group names and client ids are
single topic levels: letters, digits, ``-`` and ``_`` only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AgentError

DEFAULT_PREFIX = "tensorslm"
_LEVEL = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class BadTopicName(AgentError, ValueError):
    """A device id, group, client id or prefix cannot be used as a topic level."""


def check_level(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _LEVEL.match(value):
        raise BadTopicName(
            f"{kind} must be 1-64 letters, digits, '-' or '_' (one MQTT topic level); got {value!r}")
    return value


def check_prefix(prefix: str) -> str:
    parts = prefix.split("/")
    for part in parts:
        check_level("topic prefix level", part)
    return prefix


@dataclass(frozen=True)
class Topics:
    """Topic names for one prefix. ``Topics("tensorslm").request("pi-01")``."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    def _device(self, device: str, leaf: str) -> str:
        return f"{self.prefix}/devices/{check_level('device id', device)}/{leaf}"

    def request(self, device: str) -> str:
        return self._device(device, "request")

    def command(self, device: str) -> str:
        return self._device(device, "command")

    def status(self, device: str) -> str:
        return self._device(device, "status")

    def telemetry(self, device: str) -> str:
        return self._device(device, "telemetry")

    def records(self, device: str) -> str:
        return self._device(device, "records")

    def fleet_request(self, group: str) -> str:
        return f"{self.prefix}/fleet/{check_level('group', group)}/request"

    def fleet_subscription(self, group: str) -> str:
        """The MQTT 5 shared subscription by which the broker balances a group's prompts."""
        return f"$share/{check_level('group', group)}/{self.fleet_request(group)}"

    def reply(self, client: str, request_id: str | None = None) -> str:
        base = f"{self.prefix}/clients/{check_level('client id', client)}/reply"
        return base if request_id is None else f"{base}/{check_level('request id', request_id)}"

    def is_reply(self, topic: str) -> bool:
        """Whether ``topic`` is in the clients' reply tree: ``{prefix}/clients/{client}/reply``
        or below it. The only topics a device publishes to outside its own."""
        head = f"{self.prefix}/clients/"
        if not topic.startswith(head):
            return False
        levels = topic[len(head):].split("/")
        return (len(levels) >= 2 and bool(_LEVEL.fullmatch(levels[0])) and levels[1] == "reply"
                and all(levels[2:]))

    # Wildcards for subscribers that watch the whole fleet (collector, dashboard feeders).
    def all_records(self) -> str:
        return f"{self.prefix}/devices/+/records"

    def all_status(self) -> str:
        return f"{self.prefix}/devices/+/status"

    def all_telemetry(self) -> str:
        return f"{self.prefix}/devices/+/telemetry"

    def device_of(self, topic: str) -> str | None:
        """The device id in a ``{prefix}/devices/{device}/...`` topic, else None."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):].split("/", 1)
        return rest[0] if len(rest) == 2 and _LEVEL.match(rest[0]) else None
