"""The collector against a real mosquitto: records stored once, malformed ones skipped,
nothing lost when the collector or the broker goes away."""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from tensorslm.fleet.central_db import CentralDB
from tensorslm.agent.topics import Topics
from tensorslm.agent.broker_config import BrokerConfig
from tensorslm.fleet.collector import (Collector, CollectorConfig, CollectorError,
                             load_config)
from tensorslm.errors import ConfigError
from tests.brokers import Broker
from tests.fake_fleet import OutboxDevice, simulate_device, simulate_fleet
from tests.wait import wait_until


def make_collector(broker: Broker, db_path: Path, client_id: str = "collector-test",
                   **options) -> Collector:
    config = CollectorConfig(
        broker=BrokerConfig(host=broker.host, port=broker.port, client_id=client_id,
                            keepalive_s=5, reconnect_min_s=0.1, reconnect_max_s=0.5),
        database=db_path, **options)
    collector = Collector(config)
    collector.start()
    if not collector.wait_connected(10):
        collector.stop()
        raise AssertionError(f"collector did not connect to {broker.url}")
    return collector


def stored(db_path: Path, table: str) -> int:
    with CentralDB(db_path) as db:
        return db.count(table)


@pytest.fixture
def persistent_broker(tmp_path):
    """A mosquitto that keeps sessions and queued messages across a graceful restart."""
    store = tmp_path / "broker-store"
    store.mkdir()
    lines = ["persistence true", f"persistence_location {store}/", "autosave_interval 1"]
    if os.geteuid() == 0:
        lines.append("user root")   # else mosquitto drops to its own user, who cannot write here
    broker = Broker.start(tmp_path / "broker", config_lines=lines)
    yield broker
    broker.stop()


def publish_fleet(fleet, agents, *, telemetry: bool = False) -> None:
    """Each simulated device's records through its outbox, until the broker acknowledged all."""
    for fake, agent in zip(fleet, agents):
        assert agent.connected.wait(5)
        for payload in fake.messages():
            agent.add(payload)
        if telemetry:
            agent.publish_telemetry(fake.telemetry[-1])
    for agent in agents:
        agent.wait_all_sent()


def test_records_from_several_devices_are_stored(mosquitto, tmp_path):
    db_path = tmp_path / "central.db"
    collector = make_collector(mosquitto, db_path)
    fleet = simulate_fleet(devices=3, queries=15)
    agents = [OutboxDevice(mosquitto, f.device, tmp_path) for f in fleet]
    try:
        publish_fleet(fleet, agents, telemetry=True)
        n_queries = sum(len(f.queries) for f in fleet)
        n_switches = sum(len(f.switches) for f in fleet)
        wait_until(lambda: collector.stats.queries == n_queries
                   and collector.stats.switches == n_switches
                   and collector.stats.telemetry >= 3, what="all records")
        agents[0].stop()   # a graceful goodbye: status offline
        wait_until(lambda: collector.stats.status >= 4, what="offline status")
    finally:
        collector.stop()      # before the others say goodbye: they stay online in the database
        for agent in agents[1:]:
            agent.stop()

    with CentralDB(db_path) as db:
        assert db.count("queries") == n_queries
        assert db.count("switches") == n_switches
        row = db.rows("queries", "request_id = ?", [fleet[1].queries[7]["request_id"]])[0]
        sent = fleet[1].queries[7]
        for key in ("device", "received_at", "energy_j", "output_tokens", "operating_point",
                    "battery_end", "outcome"):
            assert row[key] == sent[key], key
        status = {r["device"]: r for r in db.rows("fleet_status")}
        assert status["pi-01"]["status"] == "offline"
        assert status["pi-02"]["status"] == "online"
        assert status["pi-03"]["battery_percent"] == fleet[2].telemetry[-1]["battery_percent"]
        assert status["pi-02"]["queries"] == len(fleet[1].queries)
    assert collector.stats.malformed == 0


def test_a_record_sent_twice_is_stored_once(mosquitto, tmp_path):
    db_path = tmp_path / "central.db"
    collector = make_collector(mosquitto, db_path)
    fake = simulate_device("pi-07", queries=3)
    agent = OutboxDevice(mosquitto, "pi-07", tmp_path)
    try:
        assert agent.connected.wait(5)
        agent.add({"kind": "query", "record": fake.queries[0]})
        agent.wait_all_sent()
        for _ in range(2):           # its PUBACK lost twice: the outbox publishes it again
            agent.resend(fake.queries[0]["request_id"])
            agent.wait_all_sent()
        agent.add({"kind": "query", "record": fake.queries[1]})
        agent.wait_all_sent()
        wait_until(lambda: collector.stats.queries + collector.stats.duplicates == 4,
                   what="four deliveries")
    finally:
        agent.stop()
        collector.stop()
    assert collector.stats.queries == 2
    assert collector.stats.duplicates == 2
    assert stored(db_path, "queries") == 2


GOOD = simulate_device("pi-09", queries=1).queries[0]

MALFORMED = [
    (b"not json at all", "is not JSON"),
    (b"\xff\xfe{}", "is not UTF-8"),
    (json.dumps([1, 2]), "must be {\"kind\""),
    (json.dumps({"kind": "gossip", "record": GOOD}), "kind must be 'query' or 'switch'"),
    (json.dumps({"kind": "query", "record": "text"}), "must be a JSON object"),
    (json.dumps({"kind": "query", "record": {k: v for k, v in GOOD.items() if k != "outcome"}}),
     "required field 'outcome' is missing"),
    (json.dumps({"kind": "query", "record": GOOD | {"energy_j": "lots"}}),
     "field 'energy_j' must be a finite number, got str 'lots'"),
    (json.dumps({"kind": "query", "record": GOOD | {"energy_method": "a guess"}}),
     "energy_method' must be a lower-case name such as ina219"),
    (json.dumps({"kind": "query", "record": GOOD | {"battery_end": 140}}),
     "between 0 and 100, got 140"),
    (json.dumps({"kind": "query", "record": GOOD | {"device": "pi-10"}}),
     "names device 'pi-10' but arrived on the topic of device 'pi-09'"),
    (json.dumps({"kind": "switch", "record": {"device": "pi-09", "switch_id": "s1"}}),
     "required field 'time' is missing"),
]


def test_malformed_payloads_are_counted_and_skipped(mosquitto, tmp_path):
    db_path = tmp_path / "central.db"
    collector = make_collector(mosquitto, db_path)
    agent = OutboxDevice(mosquitto, "pi-09", tmp_path)
    try:
        assert agent.connected.wait(5)
        for payload, _ in MALFORMED:
            agent.publish_raw(payload)
        agent.publish_raw(b"", topic=agent.topics.telemetry("pi-09"))   # clears, not malformed
        agent.publish_raw(b"sleeping", topic=agent.topics.status("pi-09"))
        agent.publish_raw(b"{}", topic="tensorslm/devices/pi-09/records/extra")  # not subscribed
        agent.add({"kind": "query", "record": GOOD})
        agent.wait_all_sent()
        wait_until(lambda: collector.stats.queries == 1, what="the good record")
        wait_until(lambda: collector.stats.malformed == len(MALFORMED) + 1, what="rejections")
    finally:
        agent.stop()
        collector.stop()
    with CentralDB(db_path) as db:
        assert db.count("queries") == 1
        reasons = [row["reason"] for row in db.rows("rejected")]
    assert len(reasons) == len(MALFORMED) + 1
    for (_, expected), reason in zip(MALFORMED, reasons):
        assert expected in reason, (expected, reason)
    assert "status of pi-09 must be one of online, offline; got 'sleeping'" in reasons[-1]


def test_records_published_while_the_collector_is_down_arrive_later(mosquitto, tmp_path):
    db_path = tmp_path / "central.db"
    collector = make_collector(mosquitto, db_path, client_id="collector-outage")
    collector.stop()    # the broker keeps its session and queues records for it

    fleet = simulate_fleet(devices=2, queries=20)
    agents = [OutboxDevice(mosquitto, f.device, tmp_path) for f in fleet]
    try:
        publish_fleet(fleet, agents)   # acknowledged by the broker: the agents are done
        assert stored(db_path, "queries") == 0

        collector = make_collector(mosquitto, db_path, client_id="collector-outage")
        expected = sum(len(f.queries) for f in fleet)
        wait_until(lambda: collector.stats.queries == expected, what="the backlog")
        collector.stop()
    finally:
        for agent in agents:
            agent.stop()
    assert stored(db_path, "queries") == expected
    assert stored(db_path, "switches") == sum(len(f.switches) for f in fleet)


def test_a_record_that_could_not_be_committed_is_not_acknowledged(mosquitto, tmp_path):
    """Manual PUBACK: a database error leaves the message unacknowledged, so the broker
    delivers it again when the collector's session resumes."""
    db_path = tmp_path / "central.db"
    collector = make_collector(mosquitto, db_path, client_id="collector-dberror")
    real_store = collector.db.store_query

    def disk_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    collector.db.store_query = disk_full
    record = simulate_device("pi-12", queries=1).queries[0]
    agent = OutboxDevice(mosquitto, "pi-12", tmp_path)
    try:
        agent.add({"kind": "query", "record": record})
        agent.wait_all_sent()
        wait_until(lambda: collector.stats.db_errors == 1, what="the failed write")
        collector.db.store_query = real_store
        collector.stop()
        assert stored(db_path, "queries") == 0
        collector = make_collector(mosquitto, db_path, client_id="collector-dberror")
        wait_until(lambda: collector.stats.queries == 1, what="the redelivered record")
    finally:
        agent.stop()
        collector.stop()
    assert stored(db_path, "queries") == 1


def test_run_exits_with_an_error_when_the_database_fails(mosquitto, tmp_path):
    """So that systemd restarts it (Restart=on-failure) and the broker redelivers."""
    config = CollectorConfig(broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port,
                                                 client_id="collector-run", keepalive_s=5),
                             database=tmp_path / "central.db")
    collector = Collector(config)

    def disk_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    collector.db.store_switch = disk_full
    errors: list[BaseException] = []

    def run() -> None:
        try:
            collector.run(install_signals=False)
        except CollectorError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    agent = OutboxDevice(mosquitto, "pi-13", tmp_path)
    try:
        assert collector.wait_connected(10)
        agent.add({"kind": "switch", "record": simulate_device("pi-13", queries=40).switches[0]})
        thread.join(15)
    finally:
        agent.stop()
    assert not thread.is_alive()
    assert len(errors) == 1
    assert "database or disk is full; exiting so that the service restarts" in str(errors[0])


def test_the_agents_own_outbox_feeds_the_collector(mosquitto, tmp_path):
    """The contract with the agent: its query log rows, drained by its Outbox, arrive whole."""
    import paho.mqtt.client as mqtt

    from tensorslm.agent.outbox import Outbox
    from tensorslm.agent.protocol import ErrorCode, Outcome
    from tensorslm.agent.query_log import QueryLog

    db_path = tmp_path / "central.db"
    collector = make_collector(mosquitto, db_path)
    query_log = QueryLog(tmp_path / "queries.db", "pi-20")
    now = time.time()
    query_log.accept("req-1", now, None)
    query_log.finish("req-1", Outcome.OK, started_at=now + 0.01, finished_at=now + 2.5,
                     prompt_tokens=12, output_tokens=32, latency_s=2.49, ttft_s=0.2,
                     energy_j=9.8, energy_method="sysfs", energy_uncertainty_j=0.4,
                     mean_watts=3.9, operating_point="eco", rung="r16", battery_start=80.0,
                     battery_end=79.9)
    query_log.refuse("req-2", now + 1, Outcome.BUSY, ErrorCode.BUSY)
    query_log.record_switch(time=now + 3, from_point="full", to_point="eco",
                            reason="battery below 80%", battery_percent=79.9, watts=3.9)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="agent-pi-20",
                         protocol=mqtt.MQTTv5)
    outbox = Outbox(query_log, client, Topics().records("pi-20"))
    client.on_publish = lambda c, u, mid, reason, props: outbox.on_publish(mid)
    client.connect(mosquitto.host, mosquitto.port)
    client.loop_start()
    try:
        deadline = time.monotonic() + 10
        while query_log.unsent_count() and time.monotonic() < deadline:
            outbox.drain()
            time.sleep(0.05)
        assert query_log.unsent_count() == 0
        wait_until(lambda: collector.stats.queries == 2 and collector.stats.switches == 1,
                   what="the agent's rows")
    finally:
        client.loop_stop()
        client.disconnect()
        collector.stop()
    assert collector.stats.malformed == 0
    with CentralDB(db_path) as db:
        central = {row["request_id"]: row for row in db.rows("queries")}
        for row in query_log.queries():
            row.pop("sent")
            assert {k: central[row["request_id"]][k] for k in row} == row
        assert db.rows("switches")[0]["switch_id"] == query_log.switches()[0]["switch_id"]
    query_log.close()


def test_an_unexpected_error_sets_the_message_aside_and_keeps_collecting(mosquitto, tmp_path):
    db_path = tmp_path / "central.db"
    collector = make_collector(mosquitto, db_path)
    fake = simulate_device("pi-14", queries=2)

    def broken(record, device=None):
        if record["request_id"] == fake.queries[0]["request_id"]:
            raise KeyError("a bug")
        return real_store(record, device=device)

    real_store = collector.db.store_query
    collector.db.store_query = broken
    agent = OutboxDevice(mosquitto, "pi-14", tmp_path)
    try:
        for query in fake.queries:
            agent.add({"kind": "query", "record": query})
        agent.wait_all_sent()
        wait_until(lambda: collector.stats.queries == 1 and collector.stats.malformed == 1,
                   what="one stored, one set aside")
    finally:
        agent.stop()
        collector.stop()
    with CentralDB(db_path) as db:
        assert [r["request_id"] for r in db.rows("queries")] == [fake.queries[1]["request_id"]]
        assert db.rows("rejected")[0]["reason"] == "internal error: KeyError('a bug')"


def test_broker_restart_mid_stream_loses_nothing(persistent_broker, tmp_path):
    broker = persistent_broker
    db_path = tmp_path / "central.db"
    collector = make_collector(broker, db_path, client_id="collector-restart")
    fleet = simulate_fleet(devices=3, queries=30)
    agents = [OutboxDevice(broker, f.device, tmp_path) for f in fleet]
    try:
        for agent in agents:
            assert agent.connected.wait(5)
        messages = [f.messages() for f in fleet]
        longest = max(len(m) for m in messages)
        before_restart = 0
        for step in range(longest):
            if step == longest // 2:
                before_restart = collector.stats.queries
                broker.restart()      # same port; agents and collector reconnect by themselves
            for agent, queue in zip(agents, messages):
                if step < len(queue):
                    agent.add(queue[step])
            time.sleep(0.03)
        for agent in agents:
            agent.wait_all_sent(timeout=30)
        expected = sum(len(f.queries) for f in fleet)
        wait_until(lambda: stored(db_path, "queries") == expected, timeout=30,
                   what="every query record after the restart")
    finally:
        for agent in agents:
            agent.stop()
        collector.stop()
    assert 0 < before_restart < expected       # the restart really was mid-stream
    assert stored(db_path, "switches") == sum(len(f.switches) for f in fleet)
    assert collector.stats.malformed == 0


@pytest.mark.parametrize("watchdog_pid, pings", [(None, True), ("1", False)],
                         ids=["own-watchdog", "another-process-watchdog"])
def test_the_collector_pings_the_watchdog_meant_for_it(mosquitto, tmp_path, watchdog_pid, pings):
    """The agent's Notifier: READY once subscribed, WATCHDOG=1 at half of WATCHDOG_USEC, none
    when WATCHDOG_PID names another process, STOPPING=1 at the end."""
    import socket

    from tensorslm.agent.systemd_notify import Notifier

    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    environ = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
    if watchdog_pid is not None:
        environ["WATCHDOG_PID"] = watchdog_pid
    collector = Collector(CollectorConfig(
        broker=BrokerConfig(host=mosquitto.host, port=mosquitto.port, client_id="collector-wd",
                            keepalive_s=5), database=tmp_path / "central.db"))
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, kwargs={
        "stop": stop, "install_signals": False, "notifier": Notifier(environ)})
    thread.start()
    messages: list[str] = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(1024).decode())
        except socket.timeout:
            pass
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "setting stop did not end run() at once"
    while True:
        try:
            messages.append(sock.recv(1024).decode())
        except socket.timeout:
            break
    sock.close()
    assert messages[0].startswith("READY=1")
    watchdog = [m for m in messages if "WATCHDOG=1" in m]
    assert (len(watchdog) >= 4) if pings else not watchdog, messages
    assert messages[-1].startswith("STOPPING=1")


def test_sigterm_stops_the_collector_cleanly(mosquitto, tmp_path):
    """`tensorslm collect` as systemd runs it: READY on the notify socket, exit 0 on SIGTERM."""
    import signal
    import socket
    import subprocess
    import sys

    config = tmp_path / "collector.yaml"
    config.write_text(f"broker:\n  url: {mosquitto.url}\n  client_id: collector-sigterm\n"
                      f"database: central.db\n")
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(20)
    proc = subprocess.Popen([sys.executable, "-c", "from tensorslm.cli import main; main()", "collect",
                             "--config", str(config)],
                            env=os.environ | {"NOTIFY_SOCKET": str(notify)},
                            stderr=subprocess.PIPE, text=True)
    try:
        assert sock.recv(256).startswith(b"READY=1")
        agent = OutboxDevice(mosquitto, "pi-11", tmp_path)
        agent.add({"kind": "query", "record": simulate_device("pi-11", queries=1).queries[0]})
        agent.wait_all_sent()
        wait_until(lambda: (tmp_path / "central.db").exists()
                   and stored(tmp_path / "central.db", "queries") == 1, what="the record")
        agent.stop()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()


# -- collector.yaml ------------------------------------------------------------------------

def test_example_config_parses(tmp_path):
    example = Path(__file__).resolve().parents[1] / "deploy" / "collector.example.yaml"
    (tmp_path / "ca.crt").write_text("dummy")
    (tmp_path / "collector.password").write_text("s3cret\n")
    text = (example.read_text().replace("/etc/tensorslm/", "")
            .replace("/var/lib/tensorslm/", "state/"))
    (tmp_path / "collector.yaml").write_text(text)
    config = load_config(tmp_path / "collector.yaml")
    assert config.broker.url == "mqtts://broker.fleet.lan:8883"
    assert config.broker.password == "s3cret"
    assert config.broker.tls is not None and config.broker.tls.ca_file == tmp_path / "ca.crt"
    assert config.database == tmp_path / "state" / "central.db"
    assert config.broker.session_expiry_s == 604800
    assert config.ha_discovery_prefix == "homeassistant"


def test_tls_insecure_is_a_collector_key(tmp_path):
    path = tmp_path / "collector.yaml"
    path.write_text("broker:\n  url: mqtts://x\n  tls: {insecure: true}\ndatabase: c.db\n")
    assert load_config(path).broker.tls.insecure is True


@pytest.mark.parametrize("text, line, field, message", [
    ("broker:\n  url: http://x\ndatabase: c.db\n", 2, "broker.url",
     "expected a broker URL mqtt://host[:port] or mqtts://host[:port], got 'http://x'"),
    ("broker:\n  url: mqtt://x:99999\ndatabase: c.db\n", 2, "broker.url",
     "expected a port number 1-65535"),
    ("broker:\n  url: mqtt://x\n", 1, "database", "required field is missing"),
    ("broker:\n  url: mqtt://x\n  pasword: y\ndatabase: c.db\n", 3, "broker.pasword",
     "unknown field; accepted fields here:"),
    ("broker:\n  url: mqtt://x\n  password: y\ndatabase: c.db\n", 2, "broker.username",
     "a password needs a username"),
    ("broker:\n  url: mqtt://x\n  tls: {}\ndatabase: c.db\n", 3, "broker.tls",
     "a tls section needs an mqtts:// url"),
    ("broker:\n  url: mqtt://x\n  session_expiry_s: 5\ndatabase: c.db\n", 3,
     "broker.session_expiry_s", "expected at least 60, got 5"),
    ("broker:\n  url: mqtt://x\n  protocol: '5'\ndatabase: c.db\n", 3, "broker.protocol",
     "unknown field"),   # the agent's own broker key
    ("broker:\n  url: mqtts://x\n  tls: {ca_file: none.crt}\ndatabase: c.db\n", 3,
     "broker.tls.ca_file", "file not found"),
    ("broker:\n  url: mqtt://x\nprefix: a b\ndatabase: c.db\n", 3, "prefix",
     "must be 1-64 letters, digits"),
])
def test_bad_config_names_file_line_and_field(tmp_path, text, line, field, message):
    path = tmp_path / "collector.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.line == line
    assert caught.value.field == field
    assert message in caught.value.reason
