"""MQTT connections for the agent and its clients, and :class:`AskClient`, which sends prompts
to one device or to a group and reads the streamed answer (what ``tensorslm ask`` uses).

    with AskClient(BrokerConfig.from_url("mqtt://127.0.0.1:1883")) as client:
        answer = client.ask("hello", device="pi-01", on_token=print)
        answer.text, answer.body["energy"]
"""
from __future__ import annotations

import json
import logging
import socket
import ssl
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from .broker_config import BrokerConfig, MqttProtocol
from .errors import AgentError
from .protocol import BadMessage, Message, MessageType, parse_message
from .topics import Topics

log = logging.getLogger(__name__)


class BrokerUnavailable(AgentError, ConnectionError):
    """The broker could not be reached or refused the connection."""


class NoAnswer(AgentError, TimeoutError):
    """No final reply arrived in time."""


def mqtt_client(broker: BrokerConfig, client_id: str | None = None, *,
                reconnect_delay: tuple[float, float] | None = None,
                manual_ack: bool = False) -> Any:
    """The one paho client factory (callback API 2): protocol, TLS (client side, certificate
    checked unless ``tls.insecure``), credentials, capped reconnect backoff (the broker's
    ``reconnect_min_s``/``reconnect_max_s`` unless given). ``client_id`` defaults to the
    broker's (a persistent session needs a fixed one). ``manual_ack``: the caller acknowledges
    each QoS 1 message itself (after committing it). Not yet connected: :func:`connect_async`."""
    import paho.mqtt.client as mqtt

    client_id = client_id or broker.client_id or ""      # "": paho picks a random id
    protocol = mqtt.MQTTv5 if broker.protocol is MqttProtocol.V5 else mqtt.MQTTv311
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=protocol, manual_ack=manual_ack,
                         clean_session=None if protocol == mqtt.MQTTv5 else True)
    if broker.tls is not None:
        client.tls_set(ca_certs=str(broker.tls.ca_file) if broker.tls.ca_file else None,
                       certfile=str(broker.tls.cert_file) if broker.tls.cert_file else None,
                       keyfile=str(broker.tls.key_file) if broker.tls.key_file else None,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.tls_insecure_set(broker.tls.insecure)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    low, high = reconnect_delay or (broker.reconnect_min_s, broker.reconnect_max_s)
    client.reconnect_delay_set(min_delay=low, max_delay=high)
    return client


def connect_async(client: Any, broker: BrokerConfig) -> None:
    """Start connecting ``client`` (made by :func:`mqtt_client`) in the background; with
    ``broker.session_expiry_s`` (MQTT 5) the broker keeps the session and queues QoS 1
    messages while the client is away. Call ``client.loop_start()`` after."""
    if broker.session_expiry_s is None:
        client.connect_async(broker.host, broker.port, keepalive=broker.keepalive_s)
        return
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = broker.session_expiry_s
    client.connect_async(broker.host, broker.port, keepalive=broker.keepalive_s,
                         clean_start=False, properties=properties)


def disable_nagle(client: Any) -> None:
    """Send small MQTT packets at once: with Nagle's algorithm a request written while the
    previous packet awaits its (delayed) TCP ACK waits about 40 ms. Call from on_connect."""
    sock = client.socket()
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:   # e.g. a unix-socket or websocket transport
        log.debug("TCP_NODELAY not set: %s", exc)


@dataclass
class Answer:
    """The end of one request: the final message, and the tokens streamed before it."""

    request_id: str
    final: Message
    tokens: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.final.type is MessageType.REPLY

    @property
    def text(self) -> str:
        return self.final.body.get("text", "")

    @property
    def body(self) -> dict:
        return self.final.body


class AskClient:
    """Sends requests and collects the messages that come back, per request id."""

    def __init__(self, broker: BrokerConfig, *, topics: Topics | None = None,
                 client_id: str | None = None, connect_timeout: float = 10.0) -> None:
        self.broker = broker
        self.topics = topics or Topics()
        self.client_id = client_id or f"ask-{uuid.uuid4().hex[:12]}"
        # Replies come under the account's user name, the only reply tree the shipped broker
        # lets an account read; an anonymous broker (the demo's) has only the client id.
        self.reply_name = broker.username or self.client_id
        self.connect_timeout = connect_timeout
        self._cond = threading.Condition()
        self._messages: dict[str, list[Message]] = {}
        self._callbacks: dict[str, Callable[[Message], None]] = {}
        self._connected = threading.Event()
        self._connect_error: str | None = None
        self.client = mqtt_client(broker, self.client_id, reconnect_delay=(0.2, 2))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_connect_fail = self._on_connect_fail
        self.subscribed = threading.Event()
        self._failed = threading.Event()     # the first connection attempt failed
        self._reply_mid: int | None = None
        self._status_topics: set[str] = set()
        self._statuses: dict[str, str] = {}  # status topic -> retained payload

    @property
    def v5(self) -> bool:
        return self.broker.protocol is MqttProtocol.V5

    def __enter__(self) -> "AskClient":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        try:
            connect_async(self.client, self.broker)
        except (OSError, ValueError) as exc:
            raise BrokerUnavailable(f"cannot reach the broker at {self.broker.url}: {exc}") from exc
        self.client.loop_start()
        deadline = time.monotonic() + self.connect_timeout
        while not self.subscribed.is_set() and not self._failed.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.subscribed.wait(min(left, 0.02))
        if not self.subscribed.is_set():
            self.close()
            if self._failed.is_set():   # refused or unreachable: say so now, not at the timeout
                raise BrokerUnavailable(f"cannot reach the broker at {self.broker.url}: "
                                        f"{self._connect_error}")
            raise BrokerUnavailable(f"expected to connect to {self.broker.url} within "
                                    f"{self.connect_timeout:g} s; "
                                    f"{self._connect_error or 'no answer from the broker'}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connect_error = f"the broker refused: {reason_code}"
            log.warning("broker %s refused the connection: %s", self.broker.url, reason_code)
            self._failed.set()
            return
        disable_nagle(client)
        _, self._reply_mid = client.subscribe(self.topics.reply(self.reply_name) + "/#", qos=1)
        self._connected.set()

    def _on_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError` around the socket connect
        error = sys.exc_info()[1]
        self._connect_error = (f"{error.strerror or error}" if isinstance(error, OSError)
                               else "the connection failed")
        self._failed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected.clear()
        self.subscribed.clear()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if mid != self._reply_mid:   # a status subscription: refused just means unknown
            return
        if any(code.is_failure for code in reason_codes):
            self._connect_error = f"the broker refused the reply subscription: {reason_codes}"
            log.warning("%s", self._connect_error)
            self._failed.set()
            return
        self.subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic in self._status_topics:
            with self._cond:
                self._statuses[msg.topic] = msg.payload.decode("utf-8", "replace")
                self._cond.notify_all()
            return
        try:
            message = parse_message(msg.payload)
        except BadMessage as exc:
            log.warning("ignoring a message on %s: %s", msg.topic, exc)
            return
        key = message.id
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        if corr:
            key = corr.decode("utf-8", "replace")
        with self._cond:
            self._messages.setdefault(key, []).append(message)
            callback = self._callbacks.get(key)
            self._cond.notify_all()
        if callback is not None:
            callback(message)

    def device_status(self, device: str, *, wait: float = 0.5) -> str | None:
        """``device``'s retained status as the broker holds it (``online``, or ``offline``:
        the agent stopped or its last will), or None when none arrives within ``wait``
        seconds (the device never connected here, or this account may not read it)."""
        topic = self.topics.status(device)
        deadline = time.monotonic() + wait
        with self._cond:
            self._statuses.pop(topic, None)
            self._status_topics.add(topic)
        self.client.subscribe(topic, qos=1)
        try:
            with self._cond:
                while topic not in self._statuses:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(left)
                return self._statuses[topic]
        finally:
            self.client.unsubscribe(topic)

    def send(self, payload: dict | bytes, *, device: str | None = None, group: str | None = None,
             request_id: str | None = None,
             on_message: Callable[[Message], None] | None = None) -> str:
        """Publish one request (QoS 1) to ``device`` or to the fleet ``group``; returns its id.
        A ``bytes`` payload is sent as it is (for testing the agent's validation)."""
        if (device is None) == (group is None):
            raise ValueError("expected exactly one of device or group")
        topic = self.topics.request(device) if device else self.topics.fleet_request(group)
        return self._publish(topic, payload, request_id=request_id, on_message=on_message)

    def command(self, device: str, command: dict, *, timeout: float = 10.0) -> Answer:
        """Send a command to ``device``'s command topic and wait for the agent's answer: a
        ``reply`` saying what was done, or an ``error`` (code ``bad_command``) saying why not.
        Shapes: ``{"command": "override", "point": NAME, "seconds": S}``,
        ``{"command": "clear_override"}``, ``{"command": "reload"}``,
        ``{"command": "load_ladder", "path": STORE_DIR}``."""
        request_id = self._publish(self.topics.command(device), command)
        return self.wait(request_id, timeout)

    def _publish(self, topic: str, payload: dict | bytes, *, request_id: str | None = None,
                 on_message: Callable[[Message], None] | None = None) -> str:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        request_id = request_id or uuid.uuid4().hex[:16]
        reply_topic = self.topics.reply(self.reply_name, request_id)
        if isinstance(payload, dict):
            payload = dict(payload)
            if not self.v5:
                payload.setdefault("reply_to", reply_topic)
                payload.setdefault("id", request_id)
            data = json.dumps(payload).encode("utf-8")
        else:
            data = payload
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = reply_topic
            properties.CorrelationData = request_id.encode("ascii")
        with self._cond:
            self._messages.setdefault(request_id, [])
            if on_message is not None:
                self._callbacks[request_id] = on_message
        info = self.client.publish(topic, data, qos=1, properties=properties)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise BrokerUnavailable(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        return request_id

    def messages(self, request_id: str) -> list[Message]:
        with self._cond:
            return list(self._messages.get(request_id, []))

    def wait(self, request_id: str, timeout: float) -> Answer:
        """Wait for the final message of ``request_id``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                messages = self._messages.get(request_id, [])
                finals = [m for m in messages if m.final]
                if finals:
                    tokens = sorted((m for m in messages if m.type is MessageType.TOKEN),
                                    key=lambda m: m.body.get("index", 0))
                    return Answer(request_id, finals[0], [m.body["text"] for m in tokens])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoAnswer(f"expected a reply to request {request_id} within "
                                   f"{timeout:g} s, got {len(messages)} messages and no final "
                                   "reply; is the agent running and subscribed?")
                self._cond.wait(left)

    def ask(self, prompt: str | None = None, *, device: str | None = None,
            group: str | None = None, timeout: float = 60.0, messages: list[dict] | None = None,
            on_token: Callable[[str], None] | None = None, **settings: Any) -> Answer:
        """Send one request and wait for its answer; ``on_token`` streams tokens."""
        payload: dict[str, Any] = {k: v for k, v in settings.items() if v is not None}
        if messages is not None:
            payload["messages"] = messages
        else:
            payload["prompt"] = prompt
        if on_token is not None:
            payload.setdefault("stream", True)

        def forward(message: Message) -> None:
            if on_token is not None and message.type is MessageType.TOKEN:
                on_token(message.body.get("text", ""))

        request_id = self.send(payload, device=device, group=group, on_message=forward)
        return self.wait(request_id, timeout)
