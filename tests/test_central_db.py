"""The central database: idempotent inserts, validation before any write, schema versions,
and dashboard views whose figures match a computation in Python."""
from __future__ import annotations

import math
import sqlite3

import pytest

from tensorslm.fleet.central_db import (SCHEMA_VERSION, CentralDB, MalformedRecord, SchemaTooNew,
                              StoreResult)
from tests.fake_fleet import simulate_device, simulate_fleet


@pytest.fixture
def db(tmp_path):
    with CentralDB(tmp_path / "central.db") as database:
        yield database


@pytest.fixture
def fleet():
    return simulate_fleet(devices=3, queries=30, seed=4)


def fill(db: CentralDB, fleet) -> None:
    for fake in fleet:
        for message in fake.messages():
            store = db.store_query if message["kind"] == "query" else db.store_switch
            assert store(message["record"], device=fake.device) is StoreResult.NEW
        for telemetry in fake.telemetry:
            db.store_telemetry(fake.device, telemetry)


def test_new_file_is_wal_at_the_current_schema(db):
    assert db.schema_version == SCHEMA_VERSION
    assert db.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert {"queries", "switches", "devices", "telemetry", "rejected"} <= set(db.db.table_names())
    assert {"query_energy", "tokens_per_joule", "latency_percentiles", "battery_levels",
            "point_switches", "fleet_status"} <= set(db.db.view_names())


def test_records_are_stored_once_and_a_changed_copy_replaces_the_old(db):
    record = simulate_device("pi-01", queries=1).queries[0]
    assert db.store_query(record) is StoreResult.NEW
    assert db.store_query(dict(record)) is StoreResult.DUPLICATE
    assert db.count("queries") == 1
    changed = record | {"outcome": "failed", "error_code": "killed"}
    assert db.store_query(changed) is StoreResult.UPDATED
    rows = db.rows("queries")
    assert len(rows) == 1 and rows[0]["outcome"] == "failed"
    # The same request id on another device is another query.
    assert db.store_query(record | {"device": "pi-02"}) is StoreResult.NEW
    assert db.count("queries") == 2


def test_ids_sent_as_numbers_compare_equal_to_text(db):
    switch = simulate_fleet(devices=1, queries=40)[0].switches[0] | {"switch_id": 17}
    assert db.store_switch(switch) is StoreResult.NEW
    assert db.store_switch(switch | {"switch_id": "17"}) is StoreResult.DUPLICATE


GOOD = simulate_device("pi-05", queries=1).queries[0] | {"outcome": "ok", "error_code": None}


@pytest.mark.parametrize("change, message", [
    ({"request_id": None}, "required field 'request_id' is missing"),
    ({"device": "pi 05"}, "device must be 1-64 letters, digits"),
    ({"received_at": float("nan")}, "field 'received_at' must be a finite number"),
    ({"prompt_tokens": -3}, "field 'prompt_tokens' must be >= 0, got -3"),
    ({"output_tokens": 2.5}, "field 'output_tokens' must be a whole number, got 2.5"),
    ({"output_tokens": True}, "field 'output_tokens' must be a finite number, got bool True"),
    ({"outcome": "meh"}, "must be one of accepted, ok, error, busy, expired, failed; got 'meh'"),
    ({"energy_method": "Guess work!"}, "energy_method' must be a lower-case name such as ina219"),
    ({"battery_start": -1}, "must be a percentage between 0 and 100, got -1"),
    ({"operating_point": ["a"]}, "field 'operating_point' must be text, got list"),
    ({"rung": "  "}, "field 'rung' must not be empty"),
])
def test_malformed_query_records_are_refused_whole(db, change, message):
    with pytest.raises(MalformedRecord) as caught:
        db.store_query(GOOD | change)
    assert message in str(caught.value)
    assert db.count("queries") == 0 and db.count("devices") == 0


def test_a_record_must_come_from_its_own_topic(db):
    with pytest.raises(MalformedRecord, match="names device 'pi-05' but arrived on the topic "
                                              "of device 'pi-06'"):
        db.store_query(GOOD, device="pi-06")


def test_unknown_fields_from_a_newer_agent_are_ignored(db):
    assert db.store_query(GOOD | {"gpu_temperature": 51}) is StoreResult.NEW
    assert "gpu_temperature" not in db.rows("queries")[0]
    # Every energy method the controller knows is stored, and so is a newer one.
    for index, method in enumerate(["sysfs", "gpio", "ina219", "thermal_model"]):
        record = GOOD | {"request_id": f"m{index}", "energy_method": method}
        assert db.store_query(record) is StoreResult.NEW


def test_status_and_telemetry(db):
    db.store_status("pi-01", "online")
    telemetry = {"time": 1000.0, "battery_percent": 71.5, "watts": 3.2, "operating_point": "eco",
                 "rung": "r16", "queue_depth": 2, "model": "SmolLM2-135M", "uptime_s": 12}
    db.store_telemetry("pi-01", telemetry)
    db.store_telemetry("pi-01", telemetry)          # a retained message seen again
    db.store_telemetry("pi-01", telemetry | {"time": 1060.0, "battery_percent": 70.9})
    db.store_status("pi-01", "offline")
    assert db.count("telemetry") == 2
    device = db.rows("fleet_status")[0]
    assert (device["status"], device["battery_percent"], device["operating_point"]) == (
        "offline", 70.9, "eco")
    with pytest.raises(MalformedRecord, match="must be one of online, offline; got 'asleep'"):
        db.store_status("pi-01", "asleep")
    # Telemetry figures stand alone: a bad one is dropped, the others are kept.
    db.store_telemetry("pi-01", {"time": 1120.0, "battery_percent": 69.0, "queue_depth": -1,
                                 "model": {"name": "x"}})
    device = db.rows("devices")[0]
    assert (device["battery_percent"], device["queue_depth"], device["model"]) == (69.0, None, None)
    with pytest.raises(MalformedRecord, match="telemetry of pi-01 must be a JSON object"):
        db.store_telemetry("pi-01", [1, 2])


def test_rejected_payloads_are_kept_truncated(db):
    db.store_rejected("tensorslm/devices/pi-01/records", "not JSON", b"x" * 10_000)
    row = db.rows("rejected")[0]
    assert row["reason"] == "not JSON" and len(row["payload"]) == 2000


def test_reopening_keeps_data_and_refuses_a_newer_schema(tmp_path, fleet):
    path = tmp_path / "central.db"
    with CentralDB(path) as db:
        fill(db, fleet)
    with CentralDB(path) as db:
        assert db.count("queries") == sum(len(f.queries) for f in fleet)
        db.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}; this "
                                           f"program knows versions up to {SCHEMA_VERSION}"):
        CentralDB(path)


def test_views_match_the_records(db, fleet):
    fill(db, fleet)
    answered = [q for f in fleet for q in f.queries if q["outcome"] == "ok"]
    assert len(db.rows("query_energy")) == len(answered)

    tpj = {(r["device"], r["operating_point"]): r for r in db.rows("tokens_per_joule")}
    groups: dict = {}
    for q in answered:
        groups.setdefault((q["device"], q["operating_point"]), []).append(q)
    assert set(tpj) == set(groups)
    for key, queries in groups.items():
        want = sum(q["output_tokens"] for q in queries) / sum(q["energy_j"] for q in queries)
        assert tpj[key]["tokens_per_joule"] == pytest.approx(want, abs=1e-4)
        assert tpj[key]["queries"] == len(queries)

    by_point: dict = {}
    for q in answered:
        by_point.setdefault(q["operating_point"], []).append(q["latency_s"])
    percentiles = {(r["operating_point"], r["percentile"]): r["latency_s"]
                   for r in db.rows("latency_percentiles")}
    for point, latencies in by_point.items():
        latencies.sort()
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            nearest_rank = max(1, math.ceil(q * len(latencies)))
            assert percentiles[(point, name)] == latencies[nearest_rank - 1], (point, name)

    switches = db.rows("point_switches")
    assert len(switches) == sum(len(f.switches) for f in fleet) > 0
    assert all(s["time"].endswith("Z") and "T" in s["time"] for s in switches)
    battery = db.rows("battery_levels")
    assert len(battery) == sum(len(f.telemetry) + len(f.queries) for f in fleet)


def test_concurrent_reader_sees_committed_rows(tmp_path):
    """WAL: Datasette reads while the collector writes."""
    path = tmp_path / "central.db"
    with CentralDB(path) as db:
        db.store_query(GOOD)
        reader = sqlite3.connect(path)
        assert reader.execute("SELECT count(*) FROM queries").fetchone()[0] == 1
        db.store_query(GOOD | {"request_id": "another"})
        assert reader.execute("SELECT count(*) FROM query_energy").fetchone()[0] == 2
        reader.close()
