"""A new ladder sent to a running agent: verified before it replaces the active one; a bad
store is refused with its reason and the old ladder keeps serving."""
from __future__ import annotations

import json

import pytest

from tensorslm.agent.client import AskClient
from tensorslm.agent.config import ServingConfig
from tensorslm.agent.broker_config import BrokerConfig
from tensorslm.agent.generation import HFGenerator
from tensorslm.agent.topics import Topics
from tensorslm.rank_store.compress import compress_table
from tensorslm.rank_store.embedding import TTEmbedding, install
from tensorslm.rank_store.rung_spec import parse_rung_specs
from tensorslm.rank_store.store import RankStore, SourceInfo
from tests.agents import running_agent
from tests.tiny_model import tiny_model
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(120)


def make_store(path, weight, ranks, model="tiny-llama"):
    return RankStore.create(path, SourceInfo(model), weight,
                            compress_table(weight, parse_rung_specs(ranks), progress=False))


def test_bad_ladders_are_refused_and_a_good_one_is_adopted_between_queries(mosquitto, tmp_path):
    model, tokenizer = tiny_model()
    weight = model.get_input_embeddings().weight.detach().clone()
    old = make_store(tmp_path / "old", weight, "max,2x2")
    embedding = TTEmbedding.from_store(old, active="tt-2x2")
    install(model, embedding, head="tied")
    generator = HFGenerator(model, tokenizer, embedding)

    corrupt = make_store(tmp_path / "corrupt", weight, "2x2,1x1")
    rung_file = next(p for p in (tmp_path / "corrupt").iterdir() if "1x1" in p.name)
    data = bytearray(rung_file.read_bytes())
    data[-1] ^= 0xFF
    rung_file.write_bytes(bytes(data))
    foreign = make_store(tmp_path / "foreign", weight, "2x2", model="another-model")
    lacking = make_store(tmp_path / "lacking", weight, "1x1")
    good = make_store(tmp_path / "good", weight, "2x2,1x1")

    with (running_agent(mosquitto.url, "pi-l", generator, tmp_path / "l.db",
                        serving=ServingConfig(max_new_tokens=4)) as agent,
          AskClient(BrokerConfig.from_url(mosquitto.url)) as client):

        def command(path):
            client.client.publish(Topics().command("pi-l"), json.dumps(
                {"command": "load_ladder", "path": str(path)}), qos=1).wait_for_publish(5)
            wait_until(lambda: agent.ladder_event is not None
                       and agent.ladder_event.path == str(path)
                       and agent.ladder_event.status in ("refused", "active"), 20,
                       f"the ladder at {path} to be refused or adopted")
            return agent.ladder_event

        before = client.ask("hello", device="pi-l", timeout=20)
        refusals = [(command(s.path), s) for s in (corrupt, foreign, lacking)]
        still = client.ask("hello", device="pi-l", timeout=20)
        served_old = embedding.store.path
        adopted = command(good.path)
        after = client.ask("hello", device="pi-l", timeout=20)
        telemetry = agent.telemetry()

    for event, _ in refusals:
        assert event.status == "refused"
    assert "sha256" in refusals[0][0].message and rung_file.name in refusals[0][0].message
    assert "another-model" in refusals[1][0].message
    assert "lacks rungs tt-2x2" in refusals[2][0].message
    assert before.ok and still.ok and after.ok
    assert served_old == old.path and still.body["rung"] == "tt-2x2"
    assert adopted.status == "active" and embedding.store.path == good.path
    assert after.body["rung"] == "tt-2x2"
    assert telemetry["store"] == str(good.path)
    assert telemetry["ladder"] == ["full", "tt-2x2", "tt-1x1"]
    assert telemetry["ladder_update"] == {"path": str(good.path), "status": "active", "message": ""}


def test_load_ladder_needs_a_path(mosquitto, tmp_path, caplog):
    model, tokenizer = tiny_model()
    with running_agent(mosquitto.url, "pi-m", HFGenerator(model, tokenizer),
                       tmp_path / "m.db") as agent:
        agent._on_command(json.dumps({"command": "load_ladder"}).encode())
        agent._on_command(json.dumps({"command": "load_ladder", "path": str(tmp_path)}).encode())
        wait_until(lambda: agent.ladder_event is not None and agent.ladder_event.status == "refused",
                   20, "the ladder update to be refused")
    assert "expected {'command': 'load_ladder', 'path': STORE_DIR}" in caplog.text
    assert "serves the dense embedding and has no ladder to replace" in agent.ladder_event.message
