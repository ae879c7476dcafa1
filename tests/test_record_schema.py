"""The record schema's one migration runner on real SQLite files: an added column reaches old
files and new ones alike, a file from a newer program is refused, a failing migration leaves
nothing half done, and files made before the runner existed open unchanged."""
from __future__ import annotations

import sqlite3

import pytest
import sqlite_utils

from tensorslm.agent import query_log
from tensorslm.agent.query_log import QueryLog
from tensorslm.agent.record_schema import (QUERY_RECORD, Column, Kind, migrate, record_migrations,
                                           sqlite_columns, table_columns)
from tensorslm.fleet import central_db
from tensorslm.fleet.central_db import CentralDB


class TooNew(Exception):
    pass


def _create(db):
    db["queries"].create(sqlite_columns(RECORD, first=True) | {"sent": int},
                         pk=("device", "request_id"), if_not_exists=True)


RECORD = (Column("device", Kind.ID, required=True), Column("request_id", Kind.TEXT))
WITH_PRECISION = (*RECORD, Column("body_precision", Kind.TEXT, since=2))


def open_db(path):
    return sqlite_utils.Database(sqlite3.connect(str(path), isolation_level=None))


def test_an_added_column_reaches_an_old_file_and_a_new_one(tmp_path):
    old = record_migrations("t", _create, {"queries": RECORD})
    new = record_migrations("t", _create, {"queries": WITH_PRECISION})
    db = open_db(tmp_path / "old.db")
    assert migrate(db, old, path=tmp_path / "old.db", too_new=TooNew) == 1
    db["queries"].insert({"device": "pi", "request_id": "a", "sent": 0})
    assert migrate(db, new, path=tmp_path / "old.db", too_new=TooNew) == 2
    assert list(db["queries"].columns_dict) == ["device", "request_id", "sent", "body_precision"]
    assert list(db["queries"].rows) == [{"device": "pi", "request_id": "a", "sent": 0,
                                         "body_precision": None}]
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    fresh = open_db(tmp_path / "new.db")
    migrate(fresh, new, path=tmp_path / "new.db", too_new=TooNew)
    assert list(fresh["queries"].columns_dict) == list(db["queries"].columns_dict) \
        == table_columns(WITH_PRECISION, ["sent"])
    # The old program meets the new file: refused before anything is written.
    with pytest.raises(TooNew, match=r"new.db has schema version 2 \(unknown migrations: add "
                                     r"column queries.body_precision\); this program knows "
                                     r"versions up to 1: upgrade tensorslm"):
        migrate(fresh, old, path=tmp_path / "new.db", too_new=TooNew)


def test_a_failing_migration_is_rolled_back_and_stays_pending(tmp_path):
    migrations = record_migrations("t", _create, {"queries": RECORD})

    def broken(db):
        db["queries"].add_column("half", str)
        raise RuntimeError("disk full")
    migrations.add("broken", broken)
    db = open_db(tmp_path / "q.db")
    with pytest.raises(RuntimeError, match="disk full"):
        migrate(db, migrations, path=tmp_path / "q.db", too_new=TooNew)
    assert "half" not in db["queries"].columns_dict
    assert [m.name for m in migrations.set.pending(db)] == ["broken"]


@pytest.mark.parametrize("opener, migrations", [
    (lambda p: QueryLog(p, "pi-01"), query_log.MIGRATIONS),
    (CentralDB, central_db.MIGRATIONS)], ids=["query_log", "central_db"])
def test_files_made_before_the_runner_open_with_their_rows(tmp_path, opener, migrations):
    """A file of schema version 1 written by the per-file runner: PRAGMA user_version 1, no
    migration table, only the first schema's columns. It opens with its rows and gains the
    columns added since."""
    path = tmp_path / "before.db"
    first = opener(path)
    first.db.execute("DROP TABLE _sqlite_migrations")
    later = [c.name for c in QUERY_RECORD if c.since > 1]
    if later:
        first.db["queries"].transform(drop=set(later))
    first.db.execute("PRAGMA user_version = 1")
    first.db.execute("INSERT INTO queries (device, request_id, received_at, outcome) "
                     "VALUES ('pi-01', 'old', 1.0, 'ok')")
    first.close()
    again = opener(path)
    assert again.schema_version == migrations.version
    assert [r["request_id"] for r in again.db["queries"].rows] == ["old"]
    assert set(later) <= set(again.db["queries"].columns_dict)
    assert [r["name"] for r in again.db["_sqlite_migrations"].rows] == migrations.names
    again.close()
