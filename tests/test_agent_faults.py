"""The agent against a hostile or faulty world, with a real mosquitto and real SQLite files:
reply addresses aimed at device topics, request ids reused by other clients, requests for
more tokens than the device allows, a query log that cannot be written, crashes before the
interrupted replies go out, and an empty battery. Each test names the promise it checks."""
from __future__ import annotations

import json
import threading
import time

import pytest

from tensorslm.agent.client import AskClient, mqtt_client
from tensorslm.agent.broker_config import BrokerConfig, MqttProtocol
from tensorslm.agent.config import ServingConfig
from tensorslm.agent.protocol import ErrorCode, MessageType
from tensorslm.agent.topics import Topics
from tests.test_daemon_mqtt import client_for, make_agent  # noqa: F401  (fixture)
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(120)
T = Topics()


class Watcher:
    """A raw MQTT client subscribed to everything, keeping (topic, payload) in order."""

    def __init__(self, url: str, topics: list[str] = ["#"]) -> None:
        self.seen: list[tuple[str, bytes]] = []
        self.ready = threading.Event()
        self.client = mqtt_client(BrokerConfig.from_url(url), f"watch-{time.monotonic_ns()}")
        self.client.on_message = lambda c, u, msg: self.seen.append((msg.topic, msg.payload))
        self.client.on_subscribe = lambda *args: self.ready.set()
        broker = BrokerConfig.from_url(url)
        self.client.connect(broker.host, broker.port)
        self.client.subscribe([(topic, 1) for topic in topics])
        self.client.loop_start()
        assert self.ready.wait(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- reply addresses -----------------------------------------------------------------------

HIJACKS = [T.records("pi-01"), T.status("pi-01"), T.telemetry("pi-01"), T.request("pi-02"),
           T.command("pi-01"), "homeassistant/sensor/x/config"]


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
def test_replies_never_go_outside_the_client_reply_tree(mosquitto, make_agent, protocol):
    """A reply address on the device's own topics, another device's request topic or anything
    outside {prefix}/clients/<client>/reply is refused (bad_reply_to, logged) and nothing is
    published there; the collector therefore never stores a reply as a record or telemetry."""
    agent = make_agent(mosquitto.url, protocol=protocol)
    watcher = Watcher(mosquitto.url)
    raw = mqtt_client(BrokerConfig.from_url(mosquitto.url, protocol=protocol), "hijacker")
    raw.connect(mosquitto.host, mosquitto.port)
    raw.loop_start()
    try:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        for i, topic in enumerate(HIJACKS):
            payload = {"prompt": "hello", "max_new_tokens": 2, "id": f"h{i}"}
            props = None
            if protocol is MqttProtocol.V5:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = topic
                props.CorrelationData = f"h{i}".encode()
            else:
                payload["reply_to"] = topic
            raw.publish(T.request("pi-01"), json.dumps(payload).encode(), qos=1,
                        properties=props).wait_for_publish(5)
        ids = [f"h{i}" for i in range(len(HIJACKS))]
        wait_until(lambda: all(agent.log.query(i) for i in ids), 10, "a log row for each request")
        wait_until(lambda: agent.log.unsent_count() == 0, 10, "the records to go out")
        time.sleep(0.3)
    finally:
        raw.loop_stop()
        raw.disconnect()
        watcher.close()
    for rid in ids:
        row = agent.log.query(rid)
        assert (row["outcome"], row["error_code"]) == ("error", "bad_reply_to"), row
    agent_messages = [(topic, payload) for topic, payload in watcher.seen
                      if b'"type":' in payload]
    assert agent_messages == []
    for topic, payload in watcher.seen:
        if topic == T.records("pi-01"):
            assert json.loads(payload)["kind"] in ("query", "switch")
        elif topic == T.telemetry("pi-01"):
            assert json.loads(payload)["device"] == "pi-01"
        else:
            assert topic in (T.status("pi-01"), T.request("pi-01")), topic


# -- a query log that cannot be written ----------------------------------------------------------

class FullDisk:
    """The query log's real SQLite connection, with every write failing as on a full disk
    while ``full`` is set (SQLite rolls the transaction back itself, as with SQLITE_FULL)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.full = False

    def execute(self, sql: str, *args):
        import sqlite3

        if self.full and sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE",
                                                                     "DELETE"):
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def test_a_full_log_refuses_requests_with_an_error_acks_them_and_serving_resumes(
        mosquitto, make_agent):
    """Promise: a request is acknowledged only once committed or answered. With the log's
    disk full every request is answered log_unavailable (none is silently dropped, and all 40
    are acknowledged: unacknowledged ones would fill the broker's 20 in-flight slots and stop
    delivery), no row is half-written, and serving resumes when space returns."""
    agent = make_agent(mosquitto.url)
    disk = FullDisk(agent.log.db.conn)
    agent.log.db.conn = disk
    client = client_for(mosquitto)
    try:
        disk.full = True
        ids = [client.send({"prompt": "hello", "max_new_tokens": 2}, device="pi-01")
               for _ in range(40)]
        answers = [client.wait(i, 20) for i in ids]
        disk.full = False
        after = client.ask("hello", device="pi-01", max_new_tokens=2, timeout=20)
    finally:
        client.close()
    assert [(a.final.type, a.body["code"]) for a in answers] == \
        [(MessageType.ERROR, ErrorCode.LOG_UNAVAILABLE.value)] * 40
    assert "database or disk is full" in answers[0].body["message"]
    assert all(agent.log.query(i) is None for i in ids)
    assert after.ok and agent.log.query(after.request_id)["outcome"] == "ok"


def test_a_query_that_cannot_record_its_result_is_answered_and_the_agent_lives_on(
        mosquitto, make_agent):
    """Promise: the disk filling up while a query runs gets that query an answer
    (log_unavailable), not silence; the row stays 'accepted' (interrupted at the next start) and
    the agent serves again once the log can be written."""
    agent = make_agent(mosquitto.url, per_token_s=0.05)
    disk = FullDisk(agent.log.db.conn)
    agent.log.db.conn = disk
    with AskClient(BrokerConfig.from_url(mosquitto.url)) as client:
        first_token = threading.Event()
        rid = client.send({"prompt": "hello", "stream": True, "max_new_tokens": 8},
                          device="pi-01", on_message=lambda m: first_token.set())
        assert first_token.wait(10)
        disk.full = True
        answer = client.wait(rid, 20)
        disk.full = False
        after = client.ask("hello", device="pi-01", max_new_tokens=2, timeout=20)
    assert (answer.final.type, answer.body["code"]) == (MessageType.ERROR, "log_unavailable")
    assert agent.log.query(rid)["outcome"] == "accepted"
    assert after.ok


def test_a_record_acknowledged_while_the_log_is_full_is_sent_again_not_raised(tmp_path):
    """Promise: marking a record sent never raises in paho's thread or the main loop (which
    would stop the agent); a record that cannot be marked sent goes out again."""
    from types import SimpleNamespace

    from tensorslm.agent.outbox import Outbox
    from tensorslm.agent.protocol import Outcome
    from tensorslm.agent.query_log import QueryLog

    log = QueryLog(tmp_path / "q.db", "pi-01")
    log.accept("q1", 1.0, None)
    log.finish("q1", Outcome.OK, finished_at=2.0)
    sent: list[bytes] = []

    class Client:
        def publish(self, topic, payload, qos):
            sent.append(payload)
            return SimpleNamespace(rc=0, mid=len(sent))

    outbox = Outbox(log, Client(), T.records("pi-01"), resend_after_s=0.0)
    disk = FullDisk(log.db.conn)
    log.db.conn = disk
    assert outbox.drain() == 1
    disk.full = True
    outbox.on_publish(1)                     # the PUBACK arrives while the disk is full
    assert log.unsent_count() == 1
    disk.full = False
    time.sleep(0.01)
    assert outbox.drain() == 1 and sent[0] == sent[1]
    outbox.on_publish(2)
    assert log.unsent_count() == 0
    log.close()


# -- request ids are unique per requester only ---------------------------------------------------

def test_two_clients_may_use_one_request_id_and_a_repeat_is_answered(mosquitto, make_agent):
    """Promise: duplicates are keyed on (device, requester, id). Another client's reuse of an
    id is served; the same client's repeat of an answered id gets a 'duplicate' error, never
    silence."""
    agent = make_agent(mosquitto.url)
    answers = {}
    for name in ("alice-cli", "bob-cli"):
        with AskClient(BrokerConfig.from_url(mosquitto.url), client_id=name) as client:
            rid = client.send({"prompt": "hello", "max_new_tokens": 2}, device="pi-01",
                              request_id="same-id")
            answers[name] = client.wait(rid, 20)
    with AskClient(BrokerConfig.from_url(mosquitto.url), client_id="alice-cli") as client:
        rid = client.send({"prompt": "hello", "max_new_tokens": 2}, device="pi-01",
                          request_id="same-id")
        repeat = client.wait(rid, 20)
    assert answers["alice-cli"].ok and answers["bob-cli"].ok
    assert agent.log.query("same-id")["requester"] == "alice-cli"
    assert agent.log.query("bob-cli.same-id")["requester"] == "bob-cli"
    assert (repeat.final.type, repeat.body["code"]) == (MessageType.ERROR, "duplicate")
    assert "send a new id" in repeat.body["message"]


def test_a_request_answered_busy_is_served_when_retried_with_the_same_id(mosquitto, make_agent):
    agent = make_agent(mosquitto.url, per_token_s=0.1,
                       serving=ServingConfig(queue_size=1, max_new_tokens=8, max_prompt_chars=100))
    with AskClient(BrokerConfig.from_url(mosquitto.url)) as client:
        first_token = threading.Event()
        running = client.send({"prompt": "hello", "stream": True, "max_new_tokens": 10},
                              device="pi-01", on_message=lambda m: first_token.set())
        assert first_token.wait(10)
        client.send({"prompt": "hello"}, device="pi-01")
        refused = client.send({"prompt": "hello"}, device="pi-01", request_id="retry-me")
        assert client.wait(refused, 5).final.type is MessageType.BUSY
        assert client.wait(running, 20).ok
    with AskClient(BrokerConfig.from_url(mosquitto.url), client_id=client.client_id) as again:
        retry = again.send({"prompt": "hello", "max_new_tokens": 2}, device="pi-01",
                           request_id="retry-me")
        answer = again.wait(retry, 20)
    assert answer.ok
    assert agent.log.query("retry-me")["outcome"] == "ok"


# -- a hard cap on generated tokens ----------------------------------------------------------

def test_a_request_for_more_tokens_than_the_hard_limit_is_clipped_and_says_so(mosquitto,
                                                                              make_agent):
    agent = make_agent(mosquitto.url, serving=ServingConfig(max_new_tokens=4,
                                                            max_new_tokens_limit=6))
    with AskClient(BrokerConfig.from_url(mosquitto.url)) as client:
        big = client.ask("hello", device="pi-01", max_new_tokens=4096, timeout=20)
        small = client.ask("hello", device="pi-01", max_new_tokens=3, timeout=20)
    assert big.ok and big.body["output_tokens"] == 6
    assert (big.body["max_new_tokens"], big.body["clipped_from"]) == (6, 4096)
    assert small.ok and (small.body["max_new_tokens"], small.body["clipped_from"]) == (3, None)
    assert agent.log.query(big.request_id)["output_tokens"] == 6


# -- interrupted replies survive a second crash -----------------------------------------------

def test_an_interrupted_reply_survives_a_second_crash_before_it_was_sent(mosquitto, tiny,
                                                                         tmp_path):
    """Promise: the reply address of a query a crash interrupted is kept until the broker
    acknowledges the 'interrupted' reply. A run that recovers the log and dies before it ever
    connects leaves it for the next run, which answers it."""
    from tensorslm.agent.generation import HFGenerator
    from tensorslm.agent.protocol import ReplyAddress
    from tensorslm.agent.query_log import QueryLog
    from tests.agents import build_agent, running_agent
    from tests.brokers import free_port

    db = tmp_path / "pi-01.db"
    crashed = QueryLog(db, "pi-01")
    crashed.accept("cut-1", time.time(), ReplyAddress(T.reply("c1", "cut-1"), b"cut-1"), "c1")
    crashed.db.conn.close()                    # killed mid-query

    model, tokenizer = tiny
    offline = build_agent(f"mqtt://127.0.0.1:{free_port()}", "pi-01",   # no broker there
                          HFGenerator(model, tokenizer, model_ref="tiny-llama"), db,
                          client_id="agent-pi-01").start()
    time.sleep(0.5)
    offline.stop()
    offline.join(10)
    assert QueryLog(db, "pi-01").query("cut-1")["error_code"] == "interrupted"

    generator = HFGenerator(model, tokenizer, model_ref="tiny-llama")
    with (AskClient(BrokerConfig.from_url(mosquitto.url), client_id="c1") as client,
          running_agent(mosquitto.url, "pi-01", generator, db, client_id="agent-pi-01") as agent):
        answer = client.wait("cut-1", 20)
        wait_until(lambda: agent.log.recover(time.time()) == [], 10,
                   "the broker's PUBACK of the reply, which forgets its address")
    assert (answer.final.type, answer.body["code"], answer.body["id"]) == (
        MessageType.ERROR, "interrupted", "cut-1")


# -- an empty battery --------------------------------------------------------------------------

class BatteryController:
    """The part of the controller the agent reads: the latest reading of a real simulated
    battery (through the INA219 driver), no policy."""

    def __init__(self, source) -> None:
        self.source = source
        self.switches: list = []
        self.current_point = None
        self.policy = None

    @property
    def latest_reading(self):
        return self.source.read()


def test_an_empty_battery_refuses_work_and_never_records_zero_joules(mosquitto, tiny, tmp_path):
    """Promise: once the simulated battery is empty (and not on external power) the agent
    refuses new work with battery_empty and records no energy figure it did not measure;
    with external power back it serves and meters again."""
    from tensorslm.agent.generation import HFGenerator
    from tensorslm.agent.query_log import QueryLog
    from tensorslm.controller.power.energy_meter import EnergyMeter
    from tensorslm.controller.power.simulated_battery import (SimulatedBattery,
                                                              SimulatedBatterySource)
    from tests.agents import running_agent

    battery = SimulatedBattery(soc_percent=0.0, load=lambda: 3.0, capacity_wh=1.0)
    source = SimulatedBatterySource(battery)
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, model_ref="tiny-llama")
    with (running_agent(mosquitto.url, "pi-01", generator, tmp_path / "pi-01.db",
                        meter=EnergyMeter(source=source), controller=BatteryController(source)),
          AskClient(BrokerConfig.from_url(mosquitto.url)) as client):
        refused = client.ask("hello", device="pi-01", max_new_tokens=3, timeout=20)
        battery.external_power = True      # plugged in: the load is fed and measured
        served = client.ask("hello", device="pi-01", max_new_tokens=3, timeout=20)
    assert (refused.final.type, refused.body["code"]) == (MessageType.ERROR, "battery_empty")
    assert "the battery is empty (0 %, simulated)" in refused.body["message"]
    log = QueryLog(tmp_path / "pi-01.db", "pi-01")
    row = log.query(refused.request_id)
    assert (row["outcome"], row["error_code"], row["energy_j"]) == ("error", "battery_empty", None)
    assert served.ok and served.body["energy"]["method"] == "simulated"
    assert served.body["energy"]["joules"] > 0
    assert all(r["energy_j"] is None or r["energy_j"] > 0 for r in log.queries())
    log.close()


# -- shutdown with a generation still running ---------------------------------------------------

def test_sigterm_past_the_drain_timeout_stops_the_generation_and_joins_it(mosquitto, tmp_path):
    """Promise: the process never exits with a generation running on another thread (torch
    aborts with 'terminate called without an active exception'): the generator stops at the
    next token, the query is answered 'interrupted' and logged failed, and the exit code is 0."""
    import signal

    from tensorslm.agent.query_log import QueryLog
    from tests.agents import agent_process

    proc = agent_process(tmp_path, mosquitto.url, "pi-09", tmp_path / "q.db", per_token_s=0.05,
                         serving={"max_new_tokens": 8, "max_new_tokens_limit": 400,
                                  "drain_timeout_s": 0.5, "telemetry_interval_s": 1})
    try:
        watcher = Watcher(mosquitto.url, [T.status("pi-09")])
        wait_until(lambda: (T.status("pi-09"), b"online") in watcher.seen, 60,
                   "the agent process to go online")
        watcher.close()
        with AskClient(BrokerConfig.from_url(mosquitto.url)) as client:
            first_token = threading.Event()
            long = client.send({"prompt": "hello", "stream": True, "max_new_tokens": 400},
                               device="pi-09", on_message=lambda m: first_token.set())
            assert first_token.wait(20)
            proc.send_signal(signal.SIGTERM)
            answer = client.wait(long, 20)
        code = proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()
    log_text = (tmp_path / "agent.log").read_text()
    assert code == 0, log_text[-2000:]
    assert "terminate called" not in log_text
    assert (answer.final.type, answer.body["code"]) == (MessageType.ERROR, "interrupted")
    assert len(answer.tokens) < 400
    log = QueryLog(tmp_path / "q.db", "pi-09")
    row = log.query(long)
    assert (row["outcome"], row["error_code"]) == ("failed", "interrupted")
    log.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs for the query log: a disk that really fills up. Mounting needs root (the
    build machine and `make test` as root have it); elsewhere the fault-injecting tests above
    cover the same code."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory) -> "Path":
    """Write a file until the filesystem is full; returns it."""
    import errno

    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        for chunk in (65536, 4096, 512, 64, 1):
            try:
                while True:
                    out.write(b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def test_a_really_full_disk_gets_every_request_an_answer_and_serving_resumes(
        mosquitto, tiny, small_disk):
    """The query log on a real filesystem that fills up: every request is answered (served,
    when SQLite still had room, or log_unavailable), no accepted request is lost, and the
    agent serves again once space is freed."""
    from tensorslm.agent.generation import HFGenerator
    from tensorslm.agent.query_log import QueryLog
    from tests.agents import running_agent
    from tests.tiny_model import CpuTimeMeter

    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer, model_ref="tiny-llama")
    with (running_agent(mosquitto.url, "pi-01", generator, small_disk / "pi-01.db",
                        meter=CpuTimeMeter(),
                        serving=ServingConfig(max_new_tokens=2, telemetry_interval_s=0.5)),
          AskClient(BrokerConfig.from_url(mosquitto.url)) as client):
        assert client.ask("hello", device="pi-01", timeout=20).ok
        filler = fill(small_disk)
        ids = [client.send({"prompt": "hello"}, device="pi-01") for _ in range(40)]
        answers = [client.wait(i, 30) for i in ids]
        filler.unlink()
        after = client.ask("hello", device="pi-01", timeout=20)
    codes = [a.body.get("code", "ok") for a in answers]
    print(f"40 requests on a full disk: {codes.count('ok')} served, "
          f"{codes.count('log_unavailable')} log_unavailable")
    assert set(codes) <= {"ok", "log_unavailable"}, codes
    assert "log_unavailable" in codes
    assert after.ok
    log = QueryLog(small_disk / "pi-01.db", "pi-01")
    outcomes = {rid: (log.query(rid) or {}).get("outcome") for rid in ids}
    log.close()
    for rid, code in zip(ids, codes):
        # served: its row is 'ok'; refused: no row, or (result not committed) 'accepted' until
        # the next start marks it interrupted
        assert outcomes[rid] in (("ok",) if code == "ok" else (None, "accepted")), (rid, code)
