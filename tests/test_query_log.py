"""The query log on real SQLite files: the collector's schema, WAL, migrations, the life of a
row, recovery after a crash, and the outbox's view of unsent rows."""
from __future__ import annotations

import sqlite3

import pytest

from tensorslm.agent.protocol import ErrorCode, Outcome, ReplyAddress
from tensorslm.agent.query_log import SCHEMA_VERSION, QueryLog, QueryLogError, RecordKind
from tensorslm.agent.record_schema import QUERY_RECORD, SWITCH_RECORD, column_names
from tensorslm.fleet.central_db import CentralDB

@pytest.fixture
def qlog(tmp_path):
    log = QueryLog(tmp_path / "q.db", "pi-01")
    yield log
    log.close()


def columns(path, table):
    with sqlite3.connect(path) as conn:
        return [(row[1], row[2], row[5]) for row in conn.execute(f"PRAGMA table_info({table})")]


def test_schema_is_the_collectors_contract(qlog, tmp_path):
    """The query log and the central database store the same record columns (each adds its
    own bookkeeping column) with the same types and keys."""
    with CentralDB(tmp_path / "central.db"):
        pass
    for table, record, key in (("queries", QUERY_RECORD, ["device", "request_id"]),
                               ("switches", SWITCH_RECORD, ["device", "switch_id"])):
        local = columns(tmp_path / "q.db", table)
        central = columns(tmp_path / "central.db", table)
        assert [c for c in local if c[0] != "sent"] == [c for c in central
                                                        if c[0] != "collected_at"]
        assert sorted(c[0] for c in local if c[0] != "sent") == sorted(column_names(record))
        assert [name for name, _, pk in local if pk] == key
    queries = columns(tmp_path / "q.db", "queries")
    assert {name: kind for name, kind, _ in queries}["energy_j"] == "REAL"
    assert {name: kind for name, kind, _ in queries}["output_tokens"] == "INTEGER"
    with sqlite3.connect(tmp_path / "q.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_reopening_keeps_rows_and_version(tmp_path):
    log = QueryLog(tmp_path / "q.db", "pi-01")
    log.accept("a", 1.0, None)
    log.close()
    again = QueryLog(tmp_path / "q.db", "pi-01")
    assert again.schema_version == SCHEMA_VERSION and again.query("a")["outcome"] == "accepted"
    again.close()


def test_a_newer_schema_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / "q.db") as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(QueryLogError, match=f"schema version {SCHEMA_VERSION + 1}; this program "
                                            f"knows versions up to {SCHEMA_VERSION}"):
        QueryLog(tmp_path / "q.db", "pi-01")


def test_life_of_a_query(qlog):
    assert qlog.accept("q1", 10.0, ReplyAddress("r/q1", b"c1"))
    assert not qlog.accept("q1", 11.0, None)            # a redelivery is not a new query
    assert list(qlog.unsent()) == []                      # in flight: not published yet
    qlog.finish("q1", Outcome.OK, started_at=10.5, finished_at=12.0, prompt_tokens=3,
                output_tokens=8, latency_s=2.0, ttft_s=0.7, energy_j=4.2, energy_method="ina219",
                energy_uncertainty_j=0.2, mean_watts=2.8, operating_point="eco", rung="r16",
                battery_start=80.0, battery_end=79.9)
    row = qlog.query("q1")
    assert (row["outcome"], row["energy_j"], row["energy_method"], row["sent"]) == (
        "ok", 4.2, "ina219", 0)
    [(kind, key, record)] = list(qlog.unsent())
    assert (kind, key) == (RecordKind.QUERY, "q1") and "sent" not in record
    qlog.mark_sent(kind, key)
    assert qlog.query("q1")["sent"] == 1 and qlog.unsent_count() == 0


def test_finish_refuses_unknown_columns(qlog):
    qlog.accept("q1", 1.0, None)
    with pytest.raises(ValueError, match="unknown query columns \\['joules'\\]"):
        qlog.finish("q1", Outcome.OK, joules=3)


def test_refused_requests_are_logged_once(qlog):
    assert qlog.refuse("b1", 5.0, Outcome.BUSY, ErrorCode.BUSY)
    assert not qlog.refuse("b1", 6.0, Outcome.BUSY, ErrorCode.BUSY)
    row = qlog.query("b1")
    assert (row["outcome"], row["error_code"], row["finished_at"]) == ("busy", "busy", 5.0)


def test_recover_marks_interrupted_queries_failed_and_returns_their_address(tmp_path):
    log = QueryLog(tmp_path / "q.db", "pi-01")
    log.accept("done", 1.0, ReplyAddress("r/done", None))
    log.finish("done", Outcome.OK, finished_at=2.0)
    log.accept("cut", 3.0, ReplyAddress("r/cut", b"\x01\x02"))
    log.accept("silent", 4.0, None)
    log.db.conn.close()   # as if killed: no clean close
    restarted = QueryLog(tmp_path / "q.db", "pi-01")
    interrupted = restarted.recover(now=50.0)
    assert sorted((i.request_id, i.reply) for i in interrupted) == [
        ("cut", ReplyAddress("r/cut", b"\x01\x02")), ("silent", None)]
    for rid in ("cut", "silent"):
        row = restarted.query(rid)
        assert (row["outcome"], row["error_code"], row["finished_at"]) == (
            "failed", "interrupted", 50.0)
    assert restarted.query("done")["outcome"] == "ok"
    # crashed again before the interrupted reply was acknowledged: still there to answer
    restarted.db.conn.close()
    again = QueryLog(tmp_path / "q.db", "pi-01")
    assert [(i.request_id, i.reply) for i in again.recover(now=60.0)] == [
        ("cut", ReplyAddress("r/cut", b"\x01\x02"))]
    assert again.query("cut")["finished_at"] == 50.0      # marked once, not again
    again.forget_reply("cut")                             # its PUBACK came
    assert again.recover(now=70.0) == []
    again.close()


def test_a_request_id_is_unique_per_requester_and_a_busy_one_can_be_retried(tmp_path):
    log = QueryLog(tmp_path / "q.db", "pi-01")
    assert log.accept("q1", 1.0, ReplyAddress("t/clients/alice/reply/q1"), "alice") == "q1"
    assert log.accept("q1", 2.0, ReplyAddress("t/clients/bob/reply/q1"), "bob") == "bob.q1"
    assert log.accept("q1", 3.0, None, "alice") is None          # alice's retry: a duplicate
    assert log.accept("q1", 4.0, None, "bob") is None            # so is bob's
    assert log.query("bob.q1")["requester"] == "bob"
    assert log.refuse("q2", 5.0, Outcome.BUSY, ErrorCode.BUSY, "alice") == "q2"
    assert log.accept("q2", 6.0, None, "alice") == "q2"         # retried after busy: served
    row = log.query("q2")
    assert (row["outcome"], row["error_code"], row["received_at"]) == ("accepted", None, 6.0)
    log.refuse("q3", 7.0, Outcome.ERROR, ErrorCode.NOT_JSON, "alice")
    assert log.accept("q3", 8.0, None, "alice") == "q3"          # corrected and sent again
    log.finish("q3", Outcome.OK, finished_at=9.0)
    assert log.accept("q3", 10.0, None, "alice") is None         # served: never twice
    log.close()


def test_switches_and_outbox_exclusion(qlog):
    sid = qlog.record_switch(time=7.0, from_point="full", to_point="eco", reason="battery",
                             battery_percent=30.0, watts=2.5)
    qlog.refuse("e1", 8.0, Outcome.ERROR, ErrorCode.NOT_JSON)
    found = {(kind, key) for kind, key, _ in qlog.unsent()}
    assert found == {(RecordKind.SWITCH, sid), (RecordKind.QUERY, "e1")}
    rest = {(k, key) for k, key, _ in qlog.unsent(exclude={("switch", sid)})}
    assert rest == {(RecordKind.QUERY, "e1")}
    qlog.mark_sent(RecordKind.SWITCH, sid)
    assert qlog.switches()[0]["sent"] == 1 and qlog.unsent_count() == 1


def test_rows_of_other_devices_are_not_published(tmp_path):
    a = QueryLog(tmp_path / "shared.db", "pi-a")
    b = QueryLog(tmp_path / "shared.db", "pi-b")
    a.refuse("x", 1.0, Outcome.ERROR, ErrorCode.NOT_JSON)
    b.refuse("x", 1.0, Outcome.ERROR, ErrorCode.NOT_JSON)
    assert [r["device"] for _, _, r in a.unsent()] == ["pi-a"]
    a.close()
    b.close()
