"""The query log: one SQLite row per query and per operating-point switch (sqlite-utils, WAL).

The columns are the record contract of :mod:`tensorslm.agent.record_schema` (``queries`` and
``switches``, each with a local ``sent`` flag: 0/1, acknowledged by the broker); the collector
stores the same records centrally.

``reply_addresses`` (private, never published) keeps where an accepted query's reply goes,
so that a query interrupted by a crash can still be answered after a restart.

Durability: the accepted row is committed before work starts and the finished row before
the reply is sent (``synchronous=FULL``); :meth:`QueryLog.recover` marks rows a previous run
left ``accepted`` as ``failed`` with ``error_code='interrupted'``. :data:`MIGRATIONS` brings any
older file up to date through the record schema's one runner.
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import AgentError
from .protocol import ErrorCode, Outcome, ReplyAddress
from .record_schema import (QUERY_RECORD, SWITCH_RECORD, TABLES, RecordKind, migrate,
                            record_migrations, sqlite_columns, table_columns)

log = logging.getLogger(__name__)

# The tables' columns: the record's and a local 'sent' flag.
QUERY_COLUMNS = table_columns(QUERY_RECORD, ["sent"])
SWITCH_COLUMNS = table_columns(SWITCH_RECORD, ["sent"])


class QueryLogError(AgentError, OSError):
    """The query log file cannot be opened or is newer than this program."""


def _create_tables(db: Any) -> None:
    db["queries"].create(sqlite_columns(QUERY_RECORD, first=True) | {"sent": int},
                         pk=TABLES[RecordKind.QUERY][1], defaults={"sent": 0},
                         not_null={"device", "request_id", "outcome"}, if_not_exists=True)
    db["switches"].create(sqlite_columns(SWITCH_RECORD, first=True) | {"sent": int},
                          pk=TABLES[RecordKind.SWITCH][1], defaults={"sent": 0},
                          not_null={"device", "switch_id"}, if_not_exists=True)
    db["reply_addresses"].create({"device": str, "request_id": str, "topic": str,
                                  "correlation_data": bytes}, pk=("device", "request_id"),
                                 if_not_exists=True)
    db["queries"].create_index(["sent"], if_not_exists=True)
    db["queries"].create_index(["outcome"], if_not_exists=True)
    db["switches"].create_index(["sent"], if_not_exists=True)


MIGRATIONS = record_migrations("tensorslm.agent.query_log", _create_tables,
                               {"queries": QUERY_RECORD, "switches": SWITCH_RECORD})
SCHEMA_VERSION = MIGRATIONS.version


@dataclass(frozen=True)
class Interrupted:
    """A query a previous run accepted and never finished; now marked failed."""

    request_id: str              # the log key (Request.key)
    reply: ReplyAddress | None

    @property
    def reply_id(self) -> str:
        """The id the requester used (the key without its '<client>.' scope)."""
        return self.request_id.split(".", 1)[-1]


class QueryLog:
    """Thread-safe: one connection, one lock; each method is one transaction."""

    def __init__(self, path: str | Path, device: str) -> None:
        import sqlite_utils

        self.path = Path(path)
        self.device = device
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise QueryLogError(f"cannot open the query log {self.path}: {exc}") from exc
        self._lock = threading.RLock()
        self.db = sqlite_utils.Database(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            migrate(self.db, MIGRATIONS, path=self.path, too_new=QueryLogError)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:   # SQLite rolls back by itself on SQLITE_FULL and IOERR
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self.db.execute("PRAGMA user_version").fetchone()[0]

    # -- queries --------------------------------------------------------------------------------
    def exists(self, request_id: str) -> bool:
        with self._lock:
            return self.db.execute(
                "SELECT 1 FROM queries WHERE device = ? AND request_id = ?",
                [self.device, request_id]).fetchone() is not None

    def key_for(self, request_id: str, requester: str | None) -> str:
        """The log key of ``requester``'s ``request_id``: the id itself, unless another
        requester logged it first; then ``<requester>.<id>`` ('.' never occurs in an id or a
        client name, so scoped keys never collide with plain ones)."""
        with self._lock:
            row = self.db.execute("SELECT requester FROM queries WHERE device = ? AND "
                                  "request_id = ?", [self.device, request_id]).fetchone()
        if row is None or row[0] == requester:
            return request_id
        return f"{requester or '-'}.{request_id}"

    def accept(self, request_id: str, received_at: float, reply: ReplyAddress | None,
               requester: str | None = None) -> str | None:
        """Commit an accepted query (and its reply address); returns its log key
        (:meth:`key_for`). None if this requester's id is already logged (a redelivered or
        repeated request) that was served or is in flight: nothing is written. A retry of a
        request that was not served (busy, expired, refused, interrupted) is accepted and its
        row starts over."""
        with self._lock, self._transaction():
            key = self.key_for(request_id, requester)
            cur = self.db.execute(
                "INSERT INTO queries (device, request_id, received_at, outcome, requester, sent) "
                "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (device, request_id) DO UPDATE SET "
                "received_at = excluded.received_at, started_at = NULL, finished_at = NULL, "
                "outcome = excluded.outcome, error_code = NULL, sent = 0 "
                "WHERE queries.outcome NOT IN (?, ?)",
                [self.device, key, received_at, Outcome.ACCEPTED.value, requester,
                 Outcome.ACCEPTED.value, Outcome.OK.value])
            if cur.rowcount == 0:
                return None
            if reply is not None:
                self.db.execute("INSERT OR REPLACE INTO reply_addresses VALUES (?, ?, ?, ?)",
                                [self.device, key, reply.topic, reply.correlation_data])
            return key

    def refuse(self, request_id: str, received_at: float, outcome: Outcome,
               code: ErrorCode, requester: str | None = None) -> str | None:
        """Log a request answered without work (error, busy, expired on arrival); returns its
        log key, or None if this requester's id is already logged (nothing written)."""
        with self._lock, self._transaction():
            key = self.key_for(request_id, requester)
            cur = self.db.execute(
                "INSERT OR IGNORE INTO queries (device, request_id, received_at, finished_at, "
                "outcome, error_code, requester, sent) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                [self.device, key, received_at, received_at, outcome.value, code.value,
                 requester])
            return key if cur.rowcount == 1 else None

    def finish(self, request_id: str, outcome: Outcome, **fields: Any) -> None:
        """Commit the end of an accepted query (before its reply is sent)."""
        unknown = set(fields) - set(QUERY_COLUMNS)
        if unknown:
            raise ValueError(f"unknown query columns {sorted(unknown)}; valid: "
                             f"{', '.join(QUERY_COLUMNS)}")
        fields = {**fields, "outcome": outcome.value, "sent": 0}
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock, self._transaction():
            self.db.execute(f"UPDATE queries SET {assignments} WHERE device = ? AND "
                            f"request_id = ?", [*fields.values(), self.device, request_id])
            self.db.execute("DELETE FROM reply_addresses WHERE device = ? AND request_id = ?",
                            [self.device, request_id])

    def recover(self, now: float) -> list[Interrupted]:
        """Mark queries left 'accepted' by a previous run as failed ('interrupted'). Returns
        them, and those of earlier runs whose 'interrupted' reply the broker never
        acknowledged: their reply addresses stay until :meth:`forget_reply` (after the PUBACK),
        so a second crash before the reply went out does not lose it."""
        with self._lock, self._transaction():
            rows = self.db.execute(
                "SELECT q.request_id, r.topic, r.correlation_data FROM queries q LEFT JOIN "
                "reply_addresses r ON q.device = r.device AND q.request_id = r.request_id "
                "WHERE q.device = ? AND (q.outcome = ? OR (q.outcome = ? AND q.error_code = ? "
                "AND r.topic IS NOT NULL))",
                [self.device, Outcome.ACCEPTED.value, Outcome.FAILED.value,
                 ErrorCode.INTERRUPTED.value]).fetchall()
            self.db.execute(
                "UPDATE queries SET outcome = ?, error_code = ?, finished_at = ?, sent = 0 "
                "WHERE device = ? AND outcome = ?",
                [Outcome.FAILED.value, ErrorCode.INTERRUPTED.value, now, self.device,
                 Outcome.ACCEPTED.value])
        if rows:
            log.warning("%d queries of a previous run were interrupted; marked failed", len(rows))
        return [Interrupted(rid, ReplyAddress(topic, corr) if topic else None)
                for rid, topic, corr in rows]

    def forget_reply(self, request_id: str) -> None:
        """Drop a query's saved reply address (its last reply was acknowledged)."""
        with self._lock, self._transaction():
            self.db.execute("DELETE FROM reply_addresses WHERE device = ? AND request_id = ?",
                            [self.device, request_id])

    def query(self, request_id: str) -> dict | None:
        with self._lock:
            rows = list(self.db["queries"].rows_where("device = ? AND request_id = ?",
                                                      [self.device, request_id]))
        return rows[0] if rows else None

    def queries(self) -> list[dict]:
        with self._lock:
            return list(self.db["queries"].rows_where(order_by="received_at"))

    # -- switches -------------------------------------------------------------------------------
    def record_switch(self, *, time: float, from_point: str | None, to_point: str,
                      reason: str | None, battery_percent: float | None,
                      watts: float | None) -> str:
        switch_id = uuid.uuid4().hex
        with self._lock, self._transaction():
            self.db.execute(
                "INSERT INTO switches (device, switch_id, time, from_point, to_point, reason, "
                "battery_percent, watts, sent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                [self.device, switch_id, time, from_point, to_point, reason, battery_percent,
                 watts])
        return switch_id

    def switches(self) -> list[dict]:
        with self._lock:
            return list(self.db["switches"].rows_where(order_by="time"))

    # -- outbox ---------------------------------------------------------------------------------
    def unsent(self, limit: int = 100, exclude: set[tuple[str, str]] = frozenset()
               ) -> Iterator[tuple[RecordKind, str, dict]]:
        """Finished rows not yet acknowledged by the broker: ``(kind, key, row-without-sent)``.
        In-flight queries ('accepted') wait until they end."""
        with self._lock:
            found = []
            for kind, (table, pk) in TABLES.items():
                where = "device = ? AND sent = 0" + (" AND outcome != 'accepted'"
                                                     if kind is RecordKind.QUERY else "")
                for row in self.db[table].rows_where(where, [self.device],
                                                     limit=limit + len(exclude)):
                    key = row[pk[1]]
                    if (kind.value, key) in exclude:
                        continue
                    row.pop("sent")
                    found.append((kind, key, row))
        return iter(found[:limit])

    def mark_sent(self, kind: RecordKind, key: str) -> None:
        table, pk = TABLES[kind]
        with self._lock, self._transaction():
            self.db.execute(f"UPDATE {table} SET sent = 1 WHERE device = ? AND {pk[1]} = ?",
                            [self.device, key])

    def unsent_count(self) -> int:
        with self._lock:
            return sum(self.db.execute(
                f"SELECT COUNT(*) FROM {table} WHERE device = ? AND sent = 0"
                + (" AND outcome != 'accepted'" if kind is RecordKind.QUERY else ""),
                [self.device]).fetchone()[0] for kind, (table, _) in TABLES.items())
