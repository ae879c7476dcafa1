"""The central collector: every device's records, status and telemetry into one SQLite file.

``tensorslm collect --config collector.yaml`` subscribes (QoS 1) to
``{prefix}/devices/+/records``, ``.../status`` and ``.../telemetry`` and writes them into
:class:`~tensorslm.fleet.central_db.CentralDB`.

Nothing is lost across outages:

- a persistent MQTT 5 session (fixed client id, ``clean_start=False``, a session expiry
  interval): while the collector is down the broker queues the records for it and delivers
  them when it returns (the broker keeps them across its own restarts only with
  ``persistence true``);
- manual acknowledgement: a record is committed to SQLite *before* its PUBACK goes to the
  broker, so a collector killed between the two receives it again;
- the agents mark a record sent only on the broker's PUBACK and re-publish the rest after a
  reconnect, so a broker outage loses nothing either. The resulting duplicates are harmless:
  the database stores a record once per ``(device, request_id)`` / ``(device, switch_id)``.

Malformed messages are logged, counted, kept in the ``rejected`` table and acknowledged (a
redelivery would not make them valid); they never stop the collector.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorslm.agent.broker_config import BrokerConfig, read_broker
from tensorslm.agent.client import connect_async, mqtt_client
from tensorslm.agent.errors import AgentError
from tensorslm.agent.systemd_notify import Notifier, stop_on_signals
from tensorslm.agent.topics import DEFAULT_PREFIX, Topics, check_prefix
from tensorslm.config_file import Section, load_section

from .central_db import CentralDB, MalformedRecord, StoreResult
from .errors import FleetError

log = logging.getLogger(__name__)

DEFAULT_CLIENT_ID = "tensorslm-collector"
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600


class CollectorError(FleetError, RuntimeError):
    """The collector cannot run (broker refused it, database unusable)."""


# -- configuration -------------------------------------------------------------------------

@dataclass(frozen=True)
class CollectorConfig:
    broker: BrokerConfig
    database: Path
    prefix: str = DEFAULT_PREFIX
    # Home Assistant MQTT discovery prefix; None: do not announce devices to Home Assistant.
    ha_discovery_prefix: str | None = None


def _under(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def parse_broker(section: Section, base: Path) -> BrokerConfig:
    """The ``broker:`` mapping (:func:`tensorslm.agent.broker_config.read_broker`) with the
    collector's stricter checks (TLS files exist, capped backoff) and its own keys
    (``tls.insecure``, ``session_expiry_s``); always MQTT 5 (manual acknowledgement, a
    persistent session)."""
    return read_broker(section, lambda value: _under(base, value), client_id=DEFAULT_CLIENT_ID,
                       reconnect_max_s=60.0, reconnect_limits_s=(600, 3600),
                       session_expiry_s=DEFAULT_SESSION_EXPIRY_S, tls_insecure=True,
                       tls_files_must_exist=True)


def load_config(path: str | Path) -> CollectorConfig:
    """Read collector.yaml; relative paths are relative to the file's folder."""
    root = load_section(path)
    base = Path(path).resolve().parent
    broker = parse_broker(root.section("broker"), base)
    prefix = root.str("prefix", DEFAULT_PREFIX)
    try:
        check_prefix(prefix)
    except AgentError as exc:
        raise root.field_error("prefix", str(exc)) from None
    database = _under(base, root.str("database"))
    ha_prefix: str | None = None
    home_assistant = root.section("home_assistant", None)
    if home_assistant is not None:
        ha_prefix = home_assistant.str("discovery_prefix", "homeassistant")
        try:
            check_prefix(ha_prefix)
        except AgentError as exc:
            raise home_assistant.field_error("discovery_prefix", str(exc)) from None
        home_assistant.reject_unknown()
    root.reject_unknown()
    return CollectorConfig(broker=broker, database=database, prefix=prefix,  # type: ignore[arg-type]
                           ha_discovery_prefix=ha_prefix)


# -- the collector -------------------------------------------------------------------------

@dataclass
class CollectorStats:
    queries: int = 0          # new query records stored
    switches: int = 0         # new switch records stored
    duplicates: int = 0       # records seen again (re-sends): stored once
    updated: int = 0          # a known key with different values: newer copy kept
    malformed: int = 0        # rejected messages
    status: int = 0
    telemetry: int = 0
    db_errors: int = 0        # not acknowledged: the broker redelivers after a reconnect

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Collector:
    """Subscribe to the fleet and store what arrives. ``start()``/``stop()``, or ``run()``."""

    def __init__(self, config: CollectorConfig, db: CentralDB | None = None) -> None:
        import paho.mqtt.client as mqtt   # imported here: importing the CLI stays cheap

        self._mqtt = mqtt
        # Nothing is lost while we are away: a persistent session under a fixed client id.
        config = dataclasses.replace(config, broker=dataclasses.replace(
            config.broker, client_id=config.broker.client_id or DEFAULT_CLIENT_ID,
            session_expiry_s=config.broker.session_expiry_s or DEFAULT_SESSION_EXPIRY_S))
        self.config = config
        self.topics = Topics(config.prefix)
        self.db = db if db is not None else CentralDB(config.database)
        self.stats = CollectorStats()
        self.announced: set[str] = set()      # devices announced to Home Assistant
        self.failure: sqlite3.Error | None = None   # a database write failed: run() exits
        self._wake = threading.Event()
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self.client = self._make_client()

    def _make_client(self) -> Any:
        client = mqtt_client(self.config.broker, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (retrying with capped backoff) and start receiving."""
        broker = self.config.broker
        log.info("collector %s connecting to %s (prefix %s, database %s)", broker.client_id,
                 broker.url, self.config.prefix, self.db.path)
        connect_async(self.client, broker)
        self.client.loop_start()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Wait until connected and subscribed (the broker acknowledged the subscriptions)."""
        return self.connected.wait(timeout)

    def stop(self) -> None:
        """Disconnect cleanly (the broker keeps the session and queues for us) and close."""
        self.client.disconnect()
        self.client.loop_stop()
        self.connected.clear()
        self.db.close()
        log.info("collector stopped: %s", self.stats.as_dict())

    def run(self, stop: threading.Event | None = None, *, install_signals: bool = True,
            notifier: Notifier | None = None) -> None:
        """Run until ``stop`` is set or SIGTERM/SIGINT; tell systemd READY and ping its
        watchdog when run as a ``Type=notify`` unit."""
        stop = stop or threading.Event()
        notifier = notifier or Notifier()
        self._wake = stop      # setting stop, or a failed write in the MQTT thread, wakes the loop

        signals = stop_on_signals(stop.set) if install_signals else contextlib.nullcontext()
        with signals:
            self.start()
            # READY once subscribed, so that nothing published after READY can miss us; if the
            # broker is unreachable, READY anyway and keep retrying in the background.
            if not self.wait_connected(15.0):
                log.warning("broker %s not reachable yet; retrying in the background",
                            self.config.broker.url)
            notifier.ready("collecting")
            wait = 30.0
            if notifier.watchdog_interval is not None:   # never let a ping come late
                wait = min(wait, notifier.watchdog_interval / 2)
            try:
                while True:
                    stop.wait(wait)
                    if self.failure is not None:
                        raise CollectorError(
                            f"cannot write to the central database {self.db.path}: "
                            f"{self.failure}; exiting so that the service restarts; the broker "
                            f"redelivers every record that was not committed")
                    if stop.is_set():
                        break
                    notifier.watchdog_due()
                    notifier.status(self.status_line())
            finally:
                notifier.stopping()
                self.stop()

    def status_line(self) -> str:
        state = "connected" if self.connected.is_set() else "reconnecting"
        s = self.stats
        return (f"{state}; {s.queries} queries, {s.switches} switches, {s.duplicates} duplicates, "
                f"{s.malformed} malformed")

    # -- MQTT callbacks (paho's network thread) ---------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker %s refused the collector: %s", self.config.broker.url, reason_code)
            return
        SubscribeOptions = self._mqtt.SubscribeOptions
        # Subscribe on every connect: a broker that lost our session (restart without
        # persistence) must learn the subscriptions again; on a resumed session it is a no-op.
        client.subscribe([(self.topics.all_records(), SubscribeOptions(qos=1)),
                          (self.topics.all_status(), SubscribeOptions(qos=1)),
                          (self.topics.all_telemetry(), SubscribeOptions(qos=1))])
        log.info("connected to %s (session %s)", self.config.broker.url,
                 "resumed" if flags.session_present else "new")

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any,
                      properties: Any) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.error("broker %s refused %d of the collector's subscriptions (%s); check its "
                      "ACL: the collector reads %s, %s and %s", self.config.broker.url,
                      len(refused), ", ".join(refused), self.topics.all_records(),
                      self.topics.all_status(), self.topics.all_telemetry())
        self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self.connected.clear()
        if reason_code.is_failure:
            log.warning("lost the broker %s (%s); reconnecting with backoff up to %gs",
                        self.config.broker.url, reason_code, self.config.broker.reconnect_max_s)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self.handle(message.topic, message.payload)
        except sqlite3.Error as exc:
            # Not acknowledged: the broker delivers it again after the next reconnect.
            with self._lock:
                self.stats.db_errors += 1
            log.error("could not store the message on %s (%s); it stays unacknowledged",
                      message.topic, exc)
            self.failure = exc
            self._wake.set()
            return
        except Exception as exc:   # a bug must not kill paho's network thread: set it aside
            log.exception("unexpected error storing the message on %s", message.topic)
            with self._lock:
                self.stats.malformed += 1
            try:
                self.db.store_rejected(message.topic, f"internal error: {exc!r}", message.payload)
            except sqlite3.Error:
                pass
        if message.qos > 0:
            client.ack(message.mid, message.qos)

    # -- storing ----------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> None:
        """Store one message. Malformed ones are counted and kept in ``rejected``;
        database errors propagate (the caller leaves the message unacknowledged)."""
        try:
            self._store(topic, payload)
        except MalformedRecord as exc:
            with self._lock:
                self.stats.malformed += 1
            log.warning("rejected a message on %s: %s", topic, exc)
            self.db.store_rejected(topic, str(exc), payload)

    def _store(self, topic: str, payload: bytes) -> None:
        device = self.topics.device_of(topic)
        leaf = topic.rsplit("/", 1)[-1]
        if device is None or topic != f"{self.topics.prefix}/devices/{device}/{leaf}":
            raise MalformedRecord(f"topic {topic!r} is not {self.topics.prefix}/devices/<device>/"
                                  f"records|status|telemetry")
        if leaf in ("status", "telemetry") and not payload:
            # An empty retained message deletes the retained one (a device taken out of the
            # fleet): nothing to store.
            log.info("retained %s of %s cleared", leaf, device)
            return
        if leaf == "status":
            text = _text(payload, topic)
            self.db.store_status(device, text.strip())
            self._count("status")
            self._announce(device)
            return
        data = _json(payload, topic)
        if leaf == "telemetry":
            self.db.store_telemetry(device, data)
            self._count("telemetry")
            self._announce(device, data.get("model") if isinstance(data, dict) else None)
            return
        if leaf != "records":
            raise MalformedRecord(f"unexpected topic {topic!r}; expected records, status or "
                                  f"telemetry")
        if not isinstance(data, dict) or set(data) - {"kind", "record"} or "record" not in data:
            raise MalformedRecord('a record message must be {"kind": "query"|"switch", '
                                  f'"record": {{...}}}}; got {_preview(payload)}')
        kind = data.get("kind")
        if kind == "query":
            result = self.db.store_query(data["record"], device=device)
        elif kind == "switch":
            result = self.db.store_switch(data["record"], device=device)
        else:
            raise MalformedRecord(f"record kind must be 'query' or 'switch'; got {kind!r}")
        if result is StoreResult.NEW:
            self._count("queries" if kind == "query" else "switches")
        elif result is StoreResult.DUPLICATE:
            self._count("duplicates")
            log.debug("duplicate %s record from %s ignored", kind, device)
        else:
            self._count("updated")

    def _announce(self, device: str, model: Any = None) -> None:
        """Publish Home Assistant discovery for a device the first time it shows up."""
        prefix = self.config.ha_discovery_prefix
        if prefix is None or device in self.announced:
            return
        from .ha_discovery import publish_discovery

        count = publish_discovery(self.client, device, prefix=self.config.prefix,
                                  discovery_prefix=prefix,
                                  model=model if isinstance(model, str) else None)
        self.announced.add(device)
        log.info("announced %s to Home Assistant (%d entities under %s/)", device, count, prefix)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)


def _preview(payload: bytes, limit: int = 80) -> str:
    text = payload[:limit].decode("utf-8", errors="replace")
    return repr(text) + ("..." if len(payload) > limit else "")


def _text(payload: bytes, topic: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRecord(f"payload on {topic} is not UTF-8 ({exc.reason} at byte "
                              f"{exc.start})") from None


def _json(payload: bytes, topic: str) -> Any:
    text = _text(payload, topic)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MalformedRecord(f"payload on {topic} is not JSON ({exc.msg} at char {exc.pos}): "
                              f"{_preview(payload)}") from None


def collect(config_path: str | Path) -> None:
    """``tensorslm collect``: run the collector from a config file until SIGTERM."""
    config = load_config(config_path)
    try:
        db = CentralDB(config.database)
    except sqlite3.Error as exc:
        raise CollectorError(f"cannot open the central database {config.database}: {exc}") from exc
    Collector(config, db).run()
