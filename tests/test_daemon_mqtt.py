"""The agent daemon against a real mosquitto: request/reply (MQTT 5 and 3.1.1), streaming,
shared-subscription balancing, every bad input with its reply, busy, expiry, status and
telemetry, the outbox, and a broker restart mid-stream."""
from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack

import pytest

from tensorslm.agent.client import AskClient, mqtt_client
from tensorslm.agent.config import ServingConfig
from tensorslm.agent.broker_config import BrokerConfig, MqttProtocol
from tensorslm.agent.daemon import Agent
from tensorslm.agent.generation import HFGenerator
from tensorslm.agent.protocol import ErrorCode, MessageType
from tensorslm.agent.query_log import QueryLog
from tensorslm.agent.topics import Topics
from tensorslm.controller.power.readings import Method
from tests.agents import running_agent
from tests.tiny_model import CpuTimeMeter, SlowGenerator, tiny_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def make_agent(tiny, tmp_path):
    """Starts agents on the tiny model, each ready when returned; all stop after the test."""
    with ExitStack() as agents:

        def make(broker_url: str, device: str = "pi-01", *, protocol=MqttProtocol.V5,
                 per_token_s: float = 0.0, serving: ServingConfig | None = None,
                 group: str = "g1") -> Agent:
            model, tokenizer = tiny
            generator = HFGenerator(model, tokenizer, model_ref="tiny-llama")
            if per_token_s:
                generator = SlowGenerator(generator, per_token_s)
            return agents.enter_context(running_agent(
                broker_url, device, generator, tmp_path / f"{device}.db", protocol=protocol,
                client_id=f"agent-{device}", group=group, meter=CpuTimeMeter(),
                serving=serving or ServingConfig(max_prompt_chars=200, max_new_tokens=8,
                                                 telemetry_interval_s=0.5)))

        yield make


def client_for(broker, protocol=MqttProtocol.V5) -> AskClient:
    return AskClient(BrokerConfig.from_url(broker.url, protocol=protocol)).__enter__()


def send_streaming(client: AskClient, payload: dict, device: str = "pi-01") -> str:
    """Send a streaming request and return its id once its first token arrived (so the
    agent is busy with it)."""
    first_token = threading.Event()
    request_id = client.send(payload | {"stream": True}, device=device,
                             on_message=lambda m: first_token.set())
    assert first_token.wait(10), "no token within 10 s"
    return request_id


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
def test_request_reply_streams_tokens_and_logs_the_query(mosquitto, make_agent, protocol):
    agent = make_agent(mosquitto.url, protocol=protocol)
    client = client_for(mosquitto, protocol)
    try:
        tokens: list[str] = []
        answer = client.ask("hello world", device="pi-01", max_new_tokens=6, timeout=20,
                            on_token=tokens.append)
    finally:
        client.close()
    assert answer.ok, answer.body
    assert answer.body["output_tokens"] == 6
    assert "".join(tokens) == answer.text and answer.text
    assert answer.body["energy"]["method"] == Method.ESTIMATED.value
    assert answer.body["energy"]["joules"] > 0
    row = agent.log.query(answer.request_id)
    assert row["outcome"] == "ok" and row["output_tokens"] == 6
    assert row["prompt_tokens"] == 2   # "hello world" in the tiny WordLevel vocabulary
    assert row["energy_method"] == "estimated" and row["energy_j"] == answer.body["energy"]["joules"]
    assert row["received_at"] <= row["started_at"] <= row["finished_at"]
    assert 0 < row["ttft_s"] <= row["latency_s"]


def test_mqtt5_reply_echoes_correlation_data(mosquitto, make_agent):
    make_agent(mosquitto.url)
    got: list = []
    done = threading.Event()
    raw = mqtt_client(BrokerConfig.from_url(mosquitto.url), "raw-v5")

    def on_message(client, userdata, msg):
        got.append(msg)
        if json.loads(msg.payload)["type"] != "token":
            done.set()

    raw.on_message = on_message
    raw.connect(mosquitto.host, mosquitto.port)
    raw.subscribe(Topics().reply("raw-v5") + "/#", qos=1)
    raw.loop_start()
    try:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = Topics().reply("raw-v5", "x")
        props.CorrelationData = b"\x00\xffbinary-corr"
        time.sleep(0.2)
        raw.publish(Topics().request("pi-01"), b'{"prompt": "hello", "max_new_tokens": 3}',
                    qos=1, properties=props).wait_for_publish(5)
        assert done.wait(20)
    finally:
        raw.loop_stop()
        raw.disconnect()
    final = got[-1]
    assert final.topic == Topics().reply("raw-v5", "x")
    assert final.properties.CorrelationData == b"\x00\xffbinary-corr"
    assert json.loads(final.payload)["output_tokens"] == 3


def test_shared_subscription_balances_prompts_across_two_agents(mosquitto, make_agent):
    a = make_agent(mosquitto.url, "pi-a", per_token_s=0.01)
    b = make_agent(mosquitto.url, "pi-b", per_token_s=0.01)
    client = client_for(mosquitto)
    try:
        ids = [client.send({"prompt": f"hello {i}", "max_new_tokens": 3}, group="g1")
               for i in range(8)]
        answers = [client.wait(i, 30) for i in ids]
    finally:
        client.close()
    devices = [ans.body["device"] for ans in answers]
    assert all(ans.ok for ans in answers)
    assert set(devices) == {"pi-a", "pi-b"}
    logged = {r["request_id"] for r in a.log.queries()} | {r["request_id"] for r in b.log.queries()}
    assert logged == set(ids)
    assert len(a.log.queries()) + len(b.log.queries()) == 8   # each served exactly once


LONG = "word " * 50
BAD_INPUTS = [
    (b"\xff\xfe{}", ErrorCode.BAD_UTF8, "expected UTF-8 JSON"),
    (b"{not json", ErrorCode.NOT_JSON, "expected a JSON object, got invalid JSON"),
    (b"[1, 2]", ErrorCode.NOT_OBJECT, "got a JSON array"),
    (b'{"prompt": "hi", "colour": "red"}', ErrorCode.UNKNOWN_FIELD, "unknown field 'colour'"),
    (b'{"prompt": 42}', ErrorCode.WRONG_TYPE, "expected 'prompt' to be a string, got integer"),
    (b'{"prompt": "hi", "max_new_tokens": "8"}', ErrorCode.WRONG_TYPE,
     "expected 'max_new_tokens' to be an integer"),
    (b'{"prompt": "hi", "stream": 1}', ErrorCode.WRONG_TYPE, "expected 'stream' to be true or false"),
    (b'{"prompt": "hi", "max_new_tokens": 0}', ErrorCode.OUT_OF_RANGE,
     "expected 'max_new_tokens' in [1, 4096], got 0"),
    (b'{"prompt": "hi", "top_p": 0}', ErrorCode.OUT_OF_RANGE, "expected 'top_p' in (0, 1]"),
    (b'{"prompt": ""}', ErrorCode.EMPTY_PROMPT, "got an empty string"),
    (b'{"prompt": "   "}', ErrorCode.EMPTY_PROMPT, "got only whitespace"),
    (b'{"max_new_tokens": 3}', ErrorCode.MISSING_PROMPT, "expected a 'prompt' string"),
    (b'{"prompt": "a", "messages": []}', ErrorCode.PROMPT_AND_MESSAGES, "got both"),
    (json.dumps({"prompt": LONG * 2}).encode(), ErrorCode.PROMPT_TOO_LONG,
     "expected at most 200 prompt characters, got 500"),
    (b'{"messages": [{"role": "robot", "content": "hi"}]}', ErrorCode.BAD_MESSAGES,
     "expected messages[0].role to be one of system, user, assistant"),
    (b'{"messages": []}', ErrorCode.EMPTY_PROMPT, "at least one message"),
    # inputs that once escaped the parser (no reply, no log row) or reached the model
    (b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", ErrorCode.NOT_JSON,
     "Exceeds the limit (4300 digits)"),
    (b"[" * 5000 + b"]" * 5000, ErrorCode.NOT_JSON, "expected JSON nested less deeply"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, ErrorCode.NOT_JSON, "expected JSON nested less deeply"),
    (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", ErrorCode.NOT_JSON,
     "expected JSON nested less deeply"),
    (b'{"prompt": "hi", "reply_to": "\\ud800"}', ErrorCode.BAD_REPLY_TO, "got '\\ud800'"),
    (b'{"prompt": "h\\udc80i"}', ErrorCode.BAD_UTF8, "got a lone surrogate '\\udc80'"),
]


def _is_object(payload: bytes) -> bool:
    try:
        return isinstance(json.loads(payload), dict)
    except (ValueError, RecursionError):
        return False


@pytest.mark.parametrize("protocol", [MqttProtocol.V5, MqttProtocol.V311])
def test_every_bad_input_gets_an_error_reply_and_a_log_row(mosquitto, make_agent, protocol):
    agent = make_agent(mosquitto.url, protocol=protocol)
    client = client_for(mosquitto, protocol)
    try:
        if protocol is MqttProtocol.V311:
            # without MQTT 5 properties only the JSON cases can carry a reply address
            cases = [(p, c, m) for p, c, m in BAD_INPUTS if _is_object(p)
                     and "reply_to" not in json.loads(p)]
            ids = []
            for i, (payload, _, _) in enumerate(cases):
                data = json.loads(payload)
                data.update(id=f"bad{i}", reply_to=Topics().reply(client.client_id, f"bad{i}"))
                ids.append(client.send(json.dumps(data).encode(), device="pi-01",
                                       request_id=f"bad{i}"))
        else:
            cases = BAD_INPUTS
            ids = [client.send(payload, device="pi-01") for payload, _, _ in cases]
        answers = [client.wait(i, 10) for i in ids]
        # and the agent still serves
        good = client.ask("hello", device="pi-01", max_new_tokens=2, timeout=20)
    finally:
        client.close()
    assert good.ok
    for (payload, code, message), answer in zip(cases, answers):
        assert answer.final.type is MessageType.ERROR, payload
        assert answer.body["code"] == code.value, payload
        assert message in answer.body["message"], (payload, answer.body["message"])
        row = agent.log.query(answer.request_id)
        assert (row["outcome"], row["error_code"]) == ("error", code.value)


def test_bad_input_without_reply_address_is_logged(mosquitto, make_agent, caplog):
    agent = make_agent(mosquitto.url)
    raw = mqtt_client(BrokerConfig.from_url(mosquitto.url), "raw-bad")
    raw.connect(mosquitto.host, mosquitto.port)
    raw.loop_start()
    try:
        with caplog.at_level("WARNING", logger="tensorslm.agent.daemon"):
            raw.publish(Topics().request("pi-01"), b"{oops", qos=1).wait_for_publish(5)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not agent.log.queries():
                time.sleep(0.05)
    finally:
        raw.loop_stop()
        raw.disconnect()
    rows = agent.log.queries()
    assert [(r["outcome"], r["error_code"]) for r in rows] == [("error", "not_json")]
    assert any("not_json" in rec.getMessage() and "no reply address" in rec.getMessage()
               for rec in caplog.records)


def test_full_queue_answers_busy_at_once(mosquitto, make_agent):
    agent = make_agent(mosquitto.url, per_token_s=0.1,
                       serving=ServingConfig(queue_size=1, max_new_tokens=8, max_prompt_chars=100))
    client = client_for(mosquitto)
    try:
        running = send_streaming(client, {"prompt": "hello", "max_new_tokens": 10})
        queued = client.send({"prompt": "hello"}, device="pi-01")
        refused = client.send({"prompt": "hello"}, device="pi-01")
        busy = client.wait(refused, 5)
        # immediate: the running query (1 s of tokens) has not finished yet
        running_done_before_busy = any(m.final for m in client.messages(running))
        assert client.wait(running, 20).ok and client.wait(queued, 20).ok
    finally:
        client.close()
    assert busy.final.type is MessageType.BUSY and busy.body["code"] == "busy"
    assert not running_done_before_busy
    assert agent.log.query(refused)["outcome"] == "busy"


def test_expired_requests_are_answered_expired_never_served(mosquitto, make_agent):
    agent = make_agent(mosquitto.url, per_token_s=0.05)
    client = client_for(mosquitto)
    try:
        late = client.send({"prompt": "hello", "deadline": time.time() - 1}, device="pi-01")
        running = client.send({"prompt": "hello", "max_new_tokens": 20}, device="pi-01")
        # expires while waiting behind the running query (about 1 s)
        queued = client.send({"prompt": "hello", "deadline": time.time() + 0.5}, device="pi-01")
        answers = {i: client.wait(i, 20) for i in (late, running, queued)}
    finally:
        client.close()
    assert answers[late].final.type is MessageType.EXPIRED
    assert "had passed on arrival" in answers[late].body["message"]
    assert answers[queued].final.type is MessageType.EXPIRED
    assert "while queued" in answers[queued].body["message"]
    assert answers[running].ok
    for rid in (late, queued):
        row = agent.log.query(rid)
        assert row["outcome"] == "expired" and row["started_at"] is None


def test_status_birth_will_and_retained_telemetry(mosquitto, make_agent, tmp_path):
    agent = make_agent(mosquitto.url)
    seen: dict[str, bytes] = {}
    got = threading.Event()
    watcher = mqtt_client(BrokerConfig.from_url(mosquitto.url), "watcher")

    def on_message(client, userdata, msg):
        seen[msg.topic] = msg.payload
        if len(seen) >= 2:
            got.set()

    watcher.on_message = on_message
    watcher.connect(mosquitto.host, mosquitto.port)
    watcher.subscribe([(Topics().all_status(), 1), (Topics().all_telemetry(), 1)])
    watcher.loop_start()
    try:
        assert got.wait(5)
        assert seen[Topics().status("pi-01")] == b"online"
        telemetry = json.loads(seen[Topics().telemetry("pi-01")])
        assert telemetry["device"] == "pi-01" and telemetry["model"] == "tiny-llama"
        assert telemetry["queue_depth"] == 0 and telemetry["queue_size"] == 8
        # the last will: cut the agent's connection without a clean disconnect
        agent.client._sock.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen[Topics().status("pi-01")] != b"offline":
            time.sleep(0.05)
        assert seen[Topics().status("pi-01")] == b"offline"
        # it reconnects by itself and says so
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and seen[Topics().status("pi-01")] != b"online":
            time.sleep(0.05)
        assert seen[Topics().status("pi-01")] == b"online"
    finally:
        watcher.loop_stop()
        watcher.disconnect()


def test_broker_restart_mid_stream_loses_no_query_and_answers_once(mosquitto, make_agent):
    agent = make_agent(mosquitto.url, per_token_s=0.03)
    client = client_for(mosquitto)
    try:
        first_token = threading.Event()
        ids = [client.send({"prompt": f"hello {i}", "stream": True, "max_new_tokens": 8},
                           device="pi-01", on_message=lambda m: first_token.set())
               for i in range(4)]
        assert first_token.wait(10)
        mosquitto.kill()
        time.sleep(0.3)
        mosquitto.restart()
        assert client.subscribed.wait(10) and agent._connected.wait(10)
        after = client.send({"prompt": "hello after", "max_new_tokens": 3}, device="pi-01")
        assert client.wait(after, 20).ok
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(
                (agent.log.query(i) or {}).get("outcome") in (None, "accepted") for i in ids):
            time.sleep(0.05)
    finally:
        client.close()
    rows = {r["request_id"]: r for r in agent.log.queries()}
    assert set(ids) | {after} == set(rows)                       # nothing lost
    assert all(rows[i]["outcome"] == "ok" for i in ids)          # every accepted one served
    for rid in ids + [after]:
        finals = [m for m in client.messages(rid) if m.final]
        assert len(finals) <= 1, rid                              # never answered twice


def test_outbox_marks_rows_sent_only_after_puback_and_drains_after_an_outage(
        mosquitto, make_agent):
    records: list[dict] = []
    collector = mqtt_client(BrokerConfig.from_url(mosquitto.url), "collector")
    collector.on_message = lambda c, u, msg: records.append(json.loads(msg.payload))
    collector.on_connect = lambda c, u, f, rc, p: c.subscribe(Topics().all_records(), qos=1)
    subscribed = threading.Event()
    collector.on_subscribe = lambda *args: subscribed.set()
    collector.reconnect_delay_set(0.1, 0.5)
    collector.connect(mosquitto.host, mosquitto.port)
    collector.loop_start()
    assert subscribed.wait(10)
    agent = make_agent(mosquitto.url)
    client = client_for(mosquitto)
    try:
        first = client.ask("hello", device="pi-01", max_new_tokens=2, timeout=20)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not agent.log.query(first.request_id)["sent"]:
            time.sleep(0.05)
        assert agent.log.query(first.request_id)["sent"] == 1
        assert [r["record"]["request_id"] for r in records] == [first.request_id]
        assert records[0]["kind"] == "query" and "sent" not in records[0]["record"]
        assert records[0]["record"]["energy_method"] == "estimated"

        # broker down: queries finished meanwhile stay unsent
        mosquitto.kill()
        agent.client.loop_stop()  # the agent stays offline until the collector listens again
        agent._connected.clear()
        offline = agent.log
        switch = offline.record_switch(time=time.time(), from_point="full", to_point="eco",
                                       reason="battery below 40 %", battery_percent=39.0,
                                       watts=3.1)
        time.sleep(0.5)
        assert [r["sent"] for r in offline.switches()] == [0]
        subscribed.clear()
        mosquitto.restart()
        # the broker keeps no sessions across the restart: a record published before the
        # collector has subscribed again would reach nobody (and still be PUBACKed)
        assert subscribed.wait(15)
        agent.client.loop_start()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and offline.switches()[0]["sent"] == 0:
            time.sleep(0.05)
        assert offline.switches()[0]["sent"] == 1
    finally:
        client.close()
        collector.loop_stop()
        collector.disconnect()
    switch_records = [r for r in records if r["kind"] == "switch"]
    assert switch_records and switch_records[-1]["record"]["switch_id"] == switch
    assert switch_records[-1]["record"]["to_point"] == "eco"


def test_controller_drives_the_point_and_the_command_topic_overrides_it(mosquitto, tiny,
                                                                        tmp_path):
    from pathlib import Path

    from tensorslm.controller.decision.control_loop import Controller
    from tensorslm.controller.power.energy_meter import EnergyMeter
    from tensorslm.controller.decision.policy import load_policy
    from tensorslm.controller.power.simulated_battery import SimulatedBattery, SimulatedBatterySource
    from tensorslm.agent.actuator import AgentActuator

    from dataclasses import replace

    policy = load_policy(Path(__file__).resolve().parents[1] / "deploy/policies/battery.yaml")
    # the Hugging Face generator serves the fp32 body only: the points' body precision is dropped
    policy = replace(policy, points=tuple(replace(p, precision=None) for p in policy.points))
    source = SimulatedBatterySource(SimulatedBattery(soc_percent=15.0, load=lambda: 3.0))
    model, tokenizer = tiny
    generator = HFGenerator(model, tokenizer)
    actuator = AgentActuator(generator)
    controller = Controller(source, policy, actuator, interval=0.1)
    controller.start()
    try:
        with (running_agent(mosquitto.url, "pi-ctl", generator, tmp_path / "ctl.db",
                            meter=EnergyMeter(source, sample_hz=50), controller=controller,
                            actuator=actuator, serving=ServingConfig(max_new_tokens=4)) as agent,
              AskClient(BrokerConfig.from_url(mosquitto.url)) as client):
            low = client.ask("hello", device="pi-ctl", timeout=20)
            assert low.ok and low.body["operating_point"] != "full"
            assert low.body["energy"]["method"] == "simulated"
            # the operator's override arrives on the command topic
            override = {"command": "override", "point": "full", "seconds": 60}
            client.client.publish(Topics().command("pi-ctl"), json.dumps(override),
                                  qos=1).wait_for_publish(5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and controller.current_point.name != "full":
                time.sleep(0.05)
            high = client.ask("hello", device="pi-ctl", timeout=20)
            telemetry = agent.telemetry()
            time.sleep(0.2)
    finally:
        controller.stop()
    assert high.body["operating_point"] == "full" and high.body["rung"] == "full"
    assert telemetry["operating_point"] == "full" and telemetry["power_method"] == "simulated"
    assert telemetry["battery_percent"] == pytest.approx(15.0, abs=2)
    assert telemetry["watts"] > 0 and telemetry["served"] == 2
    log = QueryLog(tmp_path / "ctl.db", "pi-ctl")
    switches = log.switches()
    assert switches[0]["from_point"] is None and switches[0]["to_point"] == low.body["operating_point"]
    assert (switches[-1]["from_point"], switches[-1]["to_point"]) == (
        low.body["operating_point"], "full")
    assert "override" in switches[-1]["reason"]
    assert switches[-1]["battery_percent"] == pytest.approx(15.0, abs=2)
    row = log.query(low.request_id)
    assert row["battery_start"] == pytest.approx(15.0, abs=2)
    assert row["energy_method"] == "simulated" and row["energy_j"] > 0


def test_operating_point_switches_the_rank_store_rung_between_queries_only(
        mosquitto, tmp_path):
    import torch

    from tensorslm.agent.actuator import AgentActuator
    from tensorslm.controller.decision.operating_point import OperatingPoint
    from tensorslm.rank_store.compress import compress_table
    from tensorslm.rank_store.embedding import TTEmbedding, install
    from tensorslm.rank_store.rung_spec import parse_rung_specs
    from tensorslm.rank_store.store import RankStore, SourceInfo

    model, tokenizer = tiny_model()   # a fresh model: install() changes it
    weight = model.get_input_embeddings().weight.detach()
    store = RankStore.create(tmp_path / "store", SourceInfo("tiny-llama"), weight,
                             compress_table(weight, parse_rung_specs("max,2x2"), progress=False))
    embedding = TTEmbedding.from_store(store)
    install(model, embedding, head="dense")
    generator = SlowGenerator(HFGenerator(model, tokenizer, embedding), 0.05)
    actuator = AgentActuator(generator)
    with (running_agent(mosquitto.url, "pi-r", generator, tmp_path / "r.db", actuator=actuator,
                        serving=ServingConfig(max_new_tokens=8)) as agent,
          AskClient(BrokerConfig.from_url(mosquitto.url)) as client):
        assert agent.telemetry()["ladder"] == ["full", "tt-max", "tt-2x2"]
        before = send_streaming(client, {"prompt": "hello world"}, device="pi-r")
        # the controller's apply() arrives mid-query: it must wait for the next query
        actuator.apply(OperatingPoint("eco", rung="tt-2x2", max_new_tokens=3,
                                      threads=torch.get_num_threads()))
        assert embedding.active_rung == "full"
        old = client.wait(before, 20)
        new = client.ask("hello world", device="pi-r", timeout=20)
    assert (old.body["rung"], old.body["output_tokens"], old.body["operating_point"]) == (
        "full", 8, None)
    assert (new.body["rung"], new.body["output_tokens"], new.body["operating_point"]) == (
        "tt-2x2", 3, "eco")
    rows = {r["request_id"]: r for r in QueryLog(tmp_path / "r.db", "pi-r").queries()}
    assert (rows[old.request_id]["rung"], rows[new.request_id]["rung"]) == ("full", "tt-2x2")


def test_sampling_settings_chat_template_and_generation_errors(mosquitto, make_agent, tiny):
    agent = make_agent(mosquitto.url)
    client = client_for(mosquitto)
    chat = [{"role": "user", "content": "hello"}]
    try:
        greedy = [client.ask(messages=chat, device="pi-01", timeout=20).text for _ in range(2)]
        same_seed = [client.ask(messages=chat, device="pi-01", timeout=20, temperature=1.5,
                                seed=7).text for _ in range(2)]
        other_seed = client.ask(messages=chat, device="pi-01", timeout=20, temperature=1.5,
                                seed=8).text
        # a chat template that refuses a role, as many real ones do
        agent.generator.tokenizer.chat_template = (
            "{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ raise_exception('system messages are not supported') }}{% endif %}"
            "{{ m['content'] }} {% endfor %}")
        refused = client.ask(messages=[{"role": "system", "content": "be brief"}] + chat,
                             device="pi-01", timeout=20)
        still_ok = client.ask("hello", device="pi-01", timeout=20)
    finally:
        from tests.tiny_model import CHAT_TEMPLATE

        agent.generator.tokenizer.chat_template = CHAT_TEMPLATE
        client.close()
    assert greedy[0] == greedy[1]
    assert same_seed[0] == same_seed[1] != greedy[0]
    assert other_seed != same_seed[0]
    # the client's messages are what the template refused (tensorslm.agent.prompting)
    assert refused.final.type is MessageType.ERROR and refused.body["code"] == "bad_messages"
    assert "chat template refused the messages: system messages are not supported" in \
        refused.body["message"]
    assert still_ok.ok
    assert agent.log.query(refused.request_id)["error_code"] == "bad_messages"


def test_mqtt5_message_expiry_is_a_deadline_while_queued(mosquitto, make_agent):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    agent = make_agent(mosquitto.url, per_token_s=0.1)
    client = client_for(mosquitto)
    try:
        running = send_streaming(client, {"prompt": "hello", "max_new_tokens": 15})
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = Topics().reply(client.client_id, "short-lived")
        props.CorrelationData = b"short-lived"
        props.MessageExpiryInterval = 1
        client.client.publish(Topics().request("pi-01"), b'{"prompt": "hello"}', qos=1,
                              properties=props)
        expired = client.wait("short-lived", 20)
        assert client.wait(running, 20).ok
    finally:
        client.close()
    assert expired.final.type is MessageType.EXPIRED
    assert "while queued" in expired.body["message"]
    assert agent.log.query("short-lived")["outcome"] == "expired"
