"""The record schema: the columns of every query, switch and telemetry record, written once.

A record is born in the agent's query log (:mod:`tensorslm.agent.query_log`), published by the
outbox as ``{"kind": "query"|"switch", "record": {...}}`` on ``Topics.records(device)``, and
stored by the collector in the central database (:mod:`tensorslm.fleet.central_db`). All three
read their columns from here, and both SQLite files are migrated by the one runner below,
:func:`migrate`, which is sqlite-utils' :class:`~sqlite_utils.migrations.Migrations`.

Adding a column is one line: append ``Column("name", Kind.TEXT, since=2)`` to the record.
:func:`record_migrations` derives an ``add column`` migration from ``since`` for the query log
and the central database alike, so a file written before the column existed gains it on open,
and a new file gets it from the start. Never edit or reorder the columns without ``since``
(the first schema): files in the field were created from them.

Imports no torch, no paho: the central side uses this module.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from tensorslm.controller.power.readings import Method

from .protocol import Outcome

if TYPE_CHECKING:                                  # sqlite_utils is imported where a file opens
    import sqlite_utils

log = logging.getLogger(__name__)


class Kind(str, enum.Enum):
    """What a column holds; says both the SQLite type and how the collector validates it."""

    TEXT = "text"          # any non-empty text (numbers sent for ids are stored as text)
    ID = "id"              # a device id: one MQTT topic level
    NAME = "name"          # a short lower-case name, such as an energy method
    NUMBER = "number"      # a finite number
    COUNT = "count"        # a whole number >= 0
    PERCENT = "percent"    # a number in [0, 100]

    @property
    def sqlite_type(self) -> type:
        return {Kind.COUNT: int, Kind.NUMBER: float, Kind.PERCENT: float}.get(self, str)


@dataclass(frozen=True)
class Column:
    """One field of a record. ``since`` is the schema generation that added it (1: the first)."""

    name: str
    kind: Kind
    required: bool = False
    choices: tuple[str, ...] | None = None
    since: int = 1


class RecordKind(str, enum.Enum):
    """The ``kind`` of a published record message."""

    QUERY = "query"
    SWITCH = "switch"

    def __str__(self) -> str:
        return self.value


# Known energy methods. A newer agent may bring another one, so the collector stores any short
# lower-case name; refusing it would lose that device's records.
ENERGY_METHODS: tuple[str, ...] = tuple(method.value for method in Method)
OUTCOMES: tuple[str, ...] = tuple(outcome.value for outcome in Outcome)

# One row per query (outcome 'accepted' while in flight, then ok | error | busy | expired | failed).
QUERY_RECORD: tuple[Column, ...] = (
    Column("device", Kind.ID, required=True),
    Column("request_id", Kind.TEXT, required=True),
    Column("received_at", Kind.NUMBER, required=True),       # unix seconds, UTC
    Column("started_at", Kind.NUMBER),
    Column("finished_at", Kind.NUMBER),
    Column("prompt_tokens", Kind.COUNT),
    Column("output_tokens", Kind.COUNT),
    Column("latency_s", Kind.NUMBER),
    Column("ttft_s", Kind.NUMBER),
    Column("energy_j", Kind.NUMBER),
    Column("energy_method", Kind.NAME),
    Column("energy_uncertainty_j", Kind.NUMBER),
    Column("mean_watts", Kind.NUMBER),
    Column("operating_point", Kind.TEXT),
    Column("rung", Kind.TEXT),
    Column("battery_start", Kind.PERCENT),
    Column("battery_end", Kind.PERCENT),
    Column("outcome", Kind.TEXT, required=True, choices=OUTCOMES),
    Column("error_code", Kind.TEXT),
    # who asked: the client level of the reply topic; a request id is unique per requester, so
    # an id another requester already used is logged as '<requester>.<id>'
    Column("requester", Kind.TEXT, since=2),
    # the body precision the query ran on (fp32, bf16, int8, int4)
    Column("precision", Kind.NAME, since=2),
)

# One row per operating-point switch.
SWITCH_RECORD: tuple[Column, ...] = (
    Column("device", Kind.ID, required=True),
    Column("switch_id", Kind.TEXT, required=True),
    Column("time", Kind.NUMBER, required=True),
    Column("from_point", Kind.TEXT),
    Column("to_point", Kind.TEXT, required=True),
    Column("reason", Kind.TEXT),
    Column("battery_percent", Kind.PERCENT),
    Column("watts", Kind.NUMBER),
)

# The retained telemetry message; the collector keeps these fields (others are passed through
# as JSON in ``devices.telemetry``).
TELEMETRY_RECORD: tuple[Column, ...] = (
    Column("time", Kind.NUMBER),
    Column("battery_percent", Kind.PERCENT),
    Column("watts", Kind.NUMBER),
    Column("operating_point", Kind.TEXT),
    Column("rung", Kind.TEXT),
    Column("precision", Kind.NAME),
    Column("queue_depth", Kind.COUNT),
    Column("model", Kind.TEXT),
)

RECORDS: dict[RecordKind, tuple[Column, ...]] = {RecordKind.QUERY: QUERY_RECORD,
                                                 RecordKind.SWITCH: SWITCH_RECORD}
# (table, primary key) of each record kind, the same in the query log and the central database.
TABLES: dict[RecordKind, tuple[str, tuple[str, str]]] = {
    RecordKind.QUERY: ("queries", ("device", "request_id")),
    RecordKind.SWITCH: ("switches", ("device", "switch_id")),
}


def column_names(record: Iterable[Column]) -> list[str]:
    return [column.name for column in record]


def sqlite_columns(record: Iterable[Column], *, first: bool = False) -> dict[str, type]:
    """``{name: python type}`` for sqlite-utils' ``create``; ``first``: only the first schema's."""
    return {column.name: column.kind.sqlite_type for column in record
            if not first or column.since == 1}


def table_columns(record: Iterable[Column], local: Iterable[str]) -> list[str]:
    """The column order of a table made by :func:`record_migrations`: the first schema's record
    columns, the table's own (``local``) columns, then the columns added later."""
    record = list(record)
    return [*(c.name for c in record if c.since == 1), *local,
            *(c.name for c in record if c.since > 1)]


# -- the one migration runner --------------------------------------------------------------

class SchemaMigrations:
    """sqlite-utils' migration set, with the names it holds in order (the schema version of a
    file is how many of them it has applied)."""

    def __init__(self, name: str) -> None:
        from sqlite_utils.migrations import Migrations

        self.set = Migrations(name)
        self.names: list[str] = []

    def add(self, name: str, fn: Callable[["sqlite_utils.Database"], None]) -> None:
        self.set(name=name)(fn)
        self.names.append(name)

    @property
    def version(self) -> int:
        return len(self.names)


def record_migrations(name: str, create: Callable[["sqlite_utils.Database"], None],
                      tables: Mapping[str, tuple[Column, ...]]) -> SchemaMigrations:
    """A migration set: ``create`` (the first schema; must be re-runnable, as files made before
    this runner existed already hold it), then one ``add column TABLE.NAME`` migration per
    column with ``since > 1``, in the order the columns are listed."""
    migrations = SchemaMigrations(name)
    migrations.add("create tables", create)
    for table, record in tables.items():
        for column in record:
            if column.since > 1:
                migrations.add(f"add column {table}.{column.name}", _add_column(table, column))
    return migrations


def _add_column(table: str, column: Column) -> Callable[["sqlite_utils.Database"], None]:
    def add(db: "sqlite_utils.Database") -> None:
        if column.name not in db[table].columns_dict:
            db[table].add_column(column.name, column.kind.sqlite_type)
    return add


def migrate(db: "sqlite_utils.Database", migrations: SchemaMigrations, *, path: Path,
            too_new: Callable[[str], Exception]) -> int:
    """Bring ``db`` up to date (each migration in its own transaction, with sqlite-utils'
    ``_sqlite_migrations`` record) and return its schema version: the number of migrations
    applied, mirrored in ``PRAGMA user_version`` for anyone looking with ``sqlite3``.

    A file written by a newer tensorslm (a higher ``user_version``, or a migration this program
    does not know) is refused with ``too_new(message)`` before anything is written.
    """
    known = migrations.version
    version = db.execute("PRAGMA user_version").fetchone()[0]
    unknown = [m.name for m in migrations.set.applied(db) if m.name not in migrations.names]
    if version > known or unknown:
        extra = f" (unknown migrations: {', '.join(unknown)})" if unknown else ""
        raise too_new(f"{path} has schema version {max(version, known + len(unknown))}{extra}; "
                      f"this program knows versions up to {known}: upgrade tensorslm")
    pending = [migration.name for migration in migrations.set.pending(db)]
    migrations.set.apply(db)
    if pending or version != known:
        db.execute(f"PRAGMA user_version = {known}")
        log.info("%s migrated to schema version %d (%s)", path, known,
                 ", ".join(pending) or "version mark only")
    return known
