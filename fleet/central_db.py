"""The fleet's central SQLite database: every device's query and switch records, its status.

The collector (:mod:`tensorslm.fleet.collector`) writes here; the dashboard (:mod:`tensorslm.fleet.dashboard`)
reads the views defined at the end of this module. One file, WAL mode, so that Datasette
reads while the collector writes.

Tables (columns from :mod:`tensorslm.agent.record_schema`, migrated forward on open by its
runner):

- ``queries``   one row per query, primary key ``(device, request_id)``
- ``switches``  one row per operating-point switch, primary key ``(device, switch_id)``
- ``devices``   one row per device: status (online/offline), last seen, last telemetry
- ``telemetry`` the telemetry history (battery, watts, point), primary key ``(device, time)``
- ``rejected``  malformed messages: topic, reason and the first bytes of the payload

Every insert is idempotent: agents mark a row sent only after the broker's PUBACK, so a record
may arrive twice; the second copy changes nothing. A record is validated completely before
anything is written, so a malformed record is never stored half.
"""
from __future__ import annotations

import enum
import json
import logging
import math
import re
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import sqlite_utils

from tensorslm.agent.errors import AgentError
from tensorslm.agent.record_schema import (ENERGY_METHODS, QUERY_RECORD, SWITCH_RECORD, TABLES,
                                           TELEMETRY_RECORD, Column, Kind, RecordKind, migrate,
                                           record_migrations, sqlite_columns)
from tensorslm.agent.topics import check_level

from .errors import FleetError

log = logging.getLogger(__name__)

REJECTED_PAYLOAD_CHARS = 2000
_METHOD_NAME = re.compile(r"^[a-z0-9_]{1,32}$")
STATUSES = ("online", "offline")


class MalformedRecord(FleetError, ValueError):
    """A message from a device does not have the shape of a record. Never stored."""


class SchemaTooNew(FleetError, RuntimeError):
    """The database was written by a newer tensorslm than this one."""


class StoreResult(enum.Enum):
    NEW = "new"                # first time this record was seen
    DUPLICATE = "duplicate"    # the same record again (a re-send): nothing changed
    UPDATED = "updated"        # the same key with different values: the newer copy is kept


# -- record validation ---------------------------------------------------------------------

def _check_value(field: Column, value: Any, where: str) -> Any:
    """The value converted to its column type, or MalformedRecord naming field and value."""
    if field.kind in (Kind.TEXT, Kind.ID, Kind.NAME):
        # Ids may be sent as numbers (a row id); store them as text so keys compare equal.
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise MalformedRecord(f"{where}: field {field.name!r} must be text, "
                                  f"got {type(value).__name__} {value!r}")
        text = str(value)
        if not text.strip():
            raise MalformedRecord(f"{where}: field {field.name!r} must not be empty")
        if field.kind is Kind.ID:
            try:
                check_level(field.name, text)
            except AgentError as exc:
                raise MalformedRecord(f"{where}: {exc}") from None
        if field.kind is Kind.NAME and not _METHOD_NAME.match(text):
            raise MalformedRecord(f"{where}: field {field.name!r} must be a lower-case name "
                                  f"such as {', '.join(ENERGY_METHODS)}; got {text[:40]!r}")
        if field.choices is not None and text not in field.choices:
            raise MalformedRecord(f"{where}: field {field.name!r} must be one of "
                                  f"{', '.join(field.choices)}; got {text!r}")
        return text
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedRecord(f"{where}: field {field.name!r} must be a finite number, "
                              f"got {type(value).__name__} {value!r}")
    if field.kind is Kind.COUNT:
        if not isinstance(value, int) and not float(value).is_integer():
            raise MalformedRecord(f"{where}: field {field.name!r} must be a whole number, "
                                  f"got {value!r}")
        if value < 0:
            raise MalformedRecord(f"{where}: field {field.name!r} must be >= 0, got {value!r}")
        return int(value)
    if field.kind is Kind.PERCENT and not 0 <= value <= 100:
        raise MalformedRecord(f"{where}: field {field.name!r} must be a percentage "
                              f"between 0 and 100, got {value!r}")
    return float(value)


def validate(record: Any, fields: tuple[Column, ...], what: str, *,
             lenient: bool = False) -> dict[str, Any]:
    """A clean row with exactly ``fields`` as keys (missing optional ones as None).

    Unknown keys are ignored (a newer agent may send more); missing required keys, wrong
    types and out-of-range values raise :class:`MalformedRecord`. ``lenient`` (telemetry,
    where each figure stands alone) turns a bad optional value into None with a log line.
    """
    if not isinstance(record, Mapping):
        raise MalformedRecord(f"{what} must be a JSON object, got {type(record).__name__}")
    row: dict[str, Any] = {}
    for field in fields:
        value = record.get(field.name)
        if value is None:
            if field.required:
                raise MalformedRecord(f"{what}: required field {field.name!r} is missing "
                                      f"(got fields: {', '.join(sorted(record)) or 'none'})")
            row[field.name] = None
            continue
        try:
            row[field.name] = _check_value(field, value, what)
        except MalformedRecord as exc:
            if not lenient or field.required:
                raise
            log.warning("%s; stored as empty", exc)
            row[field.name] = None
    return row


# -- the database --------------------------------------------------------------------------

def _create_tables(db: sqlite_utils.Database) -> None:
    queries, switches = (sqlite_columns(record, first=True) | {"collected_at": float}
                         for record in (QUERY_RECORD, SWITCH_RECORD))
    db["queries"].create(queries, pk=TABLES[RecordKind.QUERY][1],
                         not_null={"received_at", "outcome"}, if_not_exists=True)
    db["switches"].create(switches, pk=TABLES[RecordKind.SWITCH][1],
                          not_null={"time", "to_point"}, if_not_exists=True)
    telemetry = sqlite_columns(TELEMETRY_RECORD, first=True)
    db["devices"].create({"device": str, "status": str, "status_at": float, "last_seen": float,
                          **{k: v for k, v in telemetry.items() if k != "time"},
                          "telemetry_at": float, "telemetry": str}, pk="device",
                         if_not_exists=True)
    db["telemetry"].create({"device": str, **telemetry}, pk=("device", "time"),
                           if_not_exists=True)
    db["rejected"].create({"id": int, "received_at": float, "topic": str, "reason": str,
                           "payload": str}, pk="id", if_not_exists=True)
    db["queries"].create_index(["finished_at"], if_not_exists=True)
    db["queries"].create_index(["device", "operating_point"], if_not_exists=True)
    db["switches"].create_index(["time"], if_not_exists=True)


MIGRATIONS = record_migrations("tensorslm.fleet.central_db", _create_tables,
                               {"queries": QUERY_RECORD, "switches": SWITCH_RECORD,
                                "devices": tuple(c for c in TELEMETRY_RECORD if c.name != "time"),
                                "telemetry": TELEMETRY_RECORD})
SCHEMA_VERSION = MIGRATIONS.version

# Timestamps as ISO 8601 UTC text, which Vega-Lite parses as temporal values.
_ISO = "strftime('%Y-%m-%dT%H:%M:%fZ', {}, 'unixepoch')"

# Views for the dashboard, rebuilt on every open (they hold no data, so need no migration).
VIEWS: dict[str, str] = {
    # One row per answered query with its energy; the time axis of the energy charts.
    "query_energy": f"""
        SELECT device, request_id, operating_point, rung,
               {_ISO.format('coalesce(finished_at, received_at)')} AS time,
               coalesce(finished_at, received_at) AS epoch,
               energy_j, energy_method, energy_uncertainty_j, output_tokens, prompt_tokens,
               latency_s, ttft_s, mean_watts,
               CASE WHEN energy_j > 0 THEN output_tokens / energy_j END AS tokens_per_joule
        FROM queries
        WHERE outcome = 'ok' AND energy_j IS NOT NULL""",
    # Generated tokens per joule, summed over all answered queries of a device at a point.
    "tokens_per_joule": """
        SELECT device, operating_point, count(*) AS queries,
               sum(output_tokens) AS output_tokens, round(sum(energy_j), 3) AS energy_j,
               round(sum(output_tokens) / sum(energy_j), 4) AS tokens_per_joule,
               round(avg(energy_j), 4) AS mean_energy_j
        FROM queries
        WHERE outcome = 'ok' AND energy_j > 0 AND output_tokens IS NOT NULL
        GROUP BY device, operating_point""",
    # Nearest-rank percentiles of latency and time to first token per operating point.
    "latency_percentiles": """
        WITH ranked AS (
            SELECT operating_point, latency_s,
                   row_number() OVER (PARTITION BY operating_point ORDER BY latency_s) AS rank,
                   count(*) OVER (PARTITION BY operating_point) AS n
            FROM queries WHERE outcome = 'ok' AND latency_s IS NOT NULL
        ), wanted(percentile, q) AS (VALUES ('p50', 0.50), ('p90', 0.90), ('p99', 0.99))
        SELECT ranked.operating_point, wanted.percentile, ranked.latency_s, ranked.n AS queries
        FROM ranked JOIN wanted
          -- rank = ceil(q * n), written without ceil() (SQLite's math functions are optional)
          ON ranked.rank = max(1, CAST(wanted.q * ranked.n AS INTEGER)
                              + (wanted.q * ranked.n > CAST(wanted.q * ranked.n AS INTEGER)))""",
    # Battery level over time: the telemetry history and each query's end reading.
    "battery_levels": f"""
        SELECT device, {_ISO.format('time')} AS time, time AS epoch, battery_percent,
               'telemetry' AS source
        FROM telemetry WHERE battery_percent IS NOT NULL AND time IS NOT NULL
        UNION ALL
        SELECT device, {_ISO.format('coalesce(finished_at, received_at)')},
               coalesce(finished_at, received_at), battery_end, 'query'
        FROM queries WHERE battery_end IS NOT NULL""",
    # Operating-point switches on a time line.
    "point_switches": f"""
        SELECT device, switch_id, {_ISO.format('time')} AS time, from_point, to_point, reason,
               battery_percent, watts
        FROM switches""",
    # One row per device: online/offline, last seen, last telemetry, totals.
    "fleet_status": f"""
        SELECT d.device, coalesce(d.status, 'unknown') AS status,
               {_ISO.format('d.last_seen')} AS last_seen,
               d.battery_percent, d.watts, d.operating_point, d.rung, d.queue_depth, d.model,
               (SELECT count(*) FROM queries q WHERE q.device = d.device) AS queries,
               (SELECT round(sum(energy_j), 3) FROM queries q WHERE q.device = d.device) AS energy_j
        FROM devices d""",
}


class CentralDB:
    """The central database. ``CentralDB(path)`` opens (creating or migrating) the file."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False: the collector's MQTT thread writes, the main thread closes.
        conn = sqlite3.connect(str(self.path), check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")   # WAL + NORMAL: durable across crashes of the process
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        self._create_views()

    # -- schema -----------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def _migrate(self) -> None:
        migrate(self.db, MIGRATIONS, path=self.path, too_new=SchemaTooNew)

    def _create_views(self) -> None:
        for name, sql in VIEWS.items():
            self.db.execute(f"DROP VIEW IF EXISTS [{name}]")
            self.db.execute(f"CREATE VIEW [{name}] AS {sql}")

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> "CentralDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -----------------------------------------------------------------------------
    def _store(self, table: str, keys: tuple[str, str], row: dict[str, Any]) -> StoreResult:
        where = " AND ".join(f"[{key}] = ?" for key in keys)
        with self.db.atomic():
            old = self.db.execute(f"SELECT * FROM [{table}] WHERE {where}",
                                  [row[key] for key in keys])
            columns = [c[0] for c in old.description]
            existing = old.fetchone()
            if existing is not None:
                before = {c: v for c, v in zip(columns, existing) if c != "collected_at"}
                if before == row:
                    return StoreResult.DUPLICATE
            self.db[table].upsert(row | {"collected_at": self.clock()}, pk=keys)
            self._seen(row["device"])
        return StoreResult.NEW if existing is None else StoreResult.UPDATED

    def store_query(self, record: Any, *, device: str | None = None) -> StoreResult:
        """Store one query record; ``device`` (from the topic) must match the record's."""
        row = validate(record, QUERY_RECORD, "query record")
        _check_device(row, device)
        return self._store(*TABLES[RecordKind.QUERY], row)

    def store_switch(self, record: Any, *, device: str | None = None) -> StoreResult:
        """Store one operating-point switch record."""
        row = validate(record, SWITCH_RECORD, "switch record")
        _check_device(row, device)
        return self._store(*TABLES[RecordKind.SWITCH], row)

    def store_status(self, device: str, status: str) -> None:
        """Record a device's retained status (``online``/``offline``)."""
        check_level("device id", device)
        if status not in STATUSES:
            raise MalformedRecord(f"status of {device} must be one of {', '.join(STATUSES)}; "
                                  f"got {status[:40]!r}")
        now = self.clock()
        with self.db.atomic():
            self.db["devices"].upsert({"device": device, "status": status, "status_at": now,
                                       "last_seen": now}, pk="device")

    def store_telemetry(self, device: str, telemetry: Any) -> None:
        """Record a device's telemetry: the last values in ``devices``, the history in
        ``telemetry`` (a retained message seen again is stored once)."""
        check_level("device id", device)
        row = validate(telemetry, TELEMETRY_RECORD, f"telemetry of {device}", lenient=True)
        now = self.clock()
        sent_at = row["time"] if row["time"] is not None else now
        with self.db.atomic():
            self.db["telemetry"].insert({"device": device, **row, "time": sent_at},
                                        pk=("device", "time"), ignore=True)
            latest = {k: v for k, v in row.items() if k != "time"}
            self.db["devices"].upsert({"device": device, **latest, "telemetry_at": sent_at,
                                       "telemetry": json.dumps(telemetry, sort_keys=True),
                                       "last_seen": now}, pk="device")

    def store_rejected(self, topic: str, reason: str, payload: bytes) -> None:
        """Keep a malformed message for the operator: topic, reason, first bytes."""
        text = payload[:REJECTED_PAYLOAD_CHARS].decode("utf-8", errors="replace")
        with self.db.atomic():
            self.db["rejected"].insert({"received_at": self.clock(), "topic": topic,
                                        "reason": reason[:500], "payload": text})

    def _seen(self, device: str) -> None:
        self.db.execute("INSERT INTO devices (device, last_seen) VALUES (?, ?) "
                        "ON CONFLICT(device) DO UPDATE SET last_seen = excluded.last_seen",
                        [device, self.clock()])

    # -- reads ------------------------------------------------------------------------------
    def count(self, table: str) -> int:
        return self.db[table].count

    def rows(self, table_or_view: str, where: str | None = None,
             params: Any = None) -> list[dict[str, Any]]:
        return list(self.db[table_or_view].rows_where(where, params))


def _check_device(row: dict[str, Any], device: str | None) -> None:
    """A device speaks only for itself: the record's device must be the topic's."""
    if device is not None and row["device"] != device:
        raise MalformedRecord(f"record names device {row['device']!r} but arrived on the topic "
                              f"of device {device!r}")
