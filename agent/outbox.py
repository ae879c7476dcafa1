"""The query log as the outbox of the central collector.

:meth:`Outbox.drain` publishes finished, unsent rows (queries and switches) to
``Topics.records(device)`` as ``{"kind": "query"|"switch", "record": {...}}`` with QoS 1, and
:meth:`Outbox.on_publish` marks a row sent only when the broker acknowledges its message id.
A row whose acknowledgement never comes is published again after ``resend_after_s`` (the
collector is idempotent on its key), and rows left unsent when the process stops go out
after the next start. So an outage of the broker or of the collector loses nothing.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from typing import Any

from .query_log import QueryLog, QueryLogError
from .record_schema import RecordKind

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, query_log: QueryLog, client: Any, topic: str, *, batch: int = 50,
                 resend_after_s: float = 60.0) -> None:
        self.log = query_log
        self.client = client
        self.topic = topic
        self.batch = batch
        self.resend_after_s = resend_after_s
        self._lock = threading.Lock()
        self._in_flight: dict[int, tuple[RecordKind, str, float]] = {}   # mid -> row, sent at
        self._early_acks: dict[int, float] = {}   # acks that beat publish() returning its mid

    @staticmethod
    def encode(kind: RecordKind, row: dict) -> bytes:
        return json.dumps({"kind": kind.value, "record": row}, separators=(",", ":")).encode()

    def drain(self) -> int:
        """Publish the next batch of unsent rows; returns how many were handed to paho."""
        import paho.mqtt.client as mqtt

        now = time.monotonic()
        with self._lock:
            for mid, (_, _, sent_at) in list(self._in_flight.items()):
                if now - sent_at > self.resend_after_s:
                    del self._in_flight[mid]      # no PUBACK in time: publish it again
            for mid, at in list(self._early_acks.items()):
                if now - at > self.resend_after_s:
                    del self._early_acks[mid]
            pending = {(kind.value, key) for kind, key, _ in self._in_flight.values()}
        published = 0
        for kind, key, row in self.log.unsent(self.batch, exclude=pending):
            info = self.client.publish(self.topic, self.encode(kind, row), qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning("cannot publish %s %s: %s", kind, key, mqtt.error_string(info.rc))
                break
            with self._lock:
                if self._early_acks.pop(info.mid, None) is not None:
                    acked = True
                else:
                    acked = False
                    self._in_flight[info.mid] = (kind, key, now)
            if acked:
                self._mark_sent(kind, key)
            published += 1
        return published

    def on_publish(self, mid: int) -> None:
        """paho's on_publish: the broker acknowledged message ``mid``."""
        with self._lock:
            entry = self._in_flight.pop(mid, None)
            if entry is None:
                self._early_acks[mid] = time.monotonic()
                return
        kind, key, _ = entry
        self._mark_sent(kind, key)

    def _mark_sent(self, kind: RecordKind, key: str) -> None:
        """Mark a row sent; if the log cannot be written (a full disk), the row stays unsent
        and goes out again (the collector stores it once). Never raises: this runs in paho's
        network thread and in the agent's main loop."""
        try:
            self.log.mark_sent(kind, key)
        except (sqlite3.Error, QueryLogError) as exc:
            log.warning("%s %s was acknowledged but cannot be marked sent (%s); it will be "
                        "sent again", kind, key, exc)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._in_flight)
