"""agent.yaml -> AgentConfig: the example parses; every bad field names file, line and field."""
from __future__ import annotations

from pathlib import Path

import pytest

from tensorslm.agent.config import load_config

from tensorslm.agent.broker_config import BrokerConfig, MqttProtocol
from tensorslm.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "agent.example.yaml"
POLICIES = EXAMPLE.parent / "policies"

MINIMAL = """\
device: pi-01
broker:
  url: mqtt://127.0.0.1:1884
model:
  ref: tiny
log: queries.db
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_example_parses(tmp_path):
    (tmp_path / "pw").write_text("secret\n")
    text = EXAMPLE.read_text().replace("/etc/tensorslm/agent.password", str(tmp_path / "pw"))
    text = text.replace("/etc/tensorslm/policy.yaml", str(POLICIES / "battery.yaml"))
    config = load_config(write(tmp_path, text))
    assert config.device == "pi-01" and config.group == "lab"
    assert (config.broker.host, config.broker.port) == ("broker.fleet.lan", 8883)
    assert config.broker.tls.ca_file == Path("/etc/tensorslm/ca.crt")
    assert config.broker.password == "secret" and config.broker.protocol is MqttProtocol.V5
    assert config.model.ref == "smollm2-135m" and config.model.head == "tied"
    assert config.power is not None and config.power.str("kind") == "ups"
    assert config.serving.queue_size == 8 and config.serving.stream is False


def test_minimal_config_defaults_and_relative_paths(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.log_path == tmp_path / "queries.db"
    assert config.broker.tls is None and config.broker.port == 1884
    assert config.broker.client_id == "tensorslm-agent-pi-01"
    assert config.group == "default" and config.topic_prefix == "tensorslm"
    assert config.policy_path is None and config.power is None


@pytest.mark.parametrize("edit, line, field, message", [
    (("device: pi-01", "device: pi/01"), 1, "device", "one MQTT topic level"),
    (("url: mqtt://127.0.0.1:1884", "url: http://x"), 3, "broker.url",
     "expected a broker URL mqtt://host[:port]"),
    (("url: mqtt://127.0.0.1:1884", "url: mqtt://h:99999"), 3, "broker.url",
     "expected a port number"),
    (("url: mqtt://127.0.0.1:1884", "url: mqtt://h\n  protocol: '4'"), 4, "broker.protocol",
     "expected one of 5, 3.1.1"),
    (("url: mqtt://127.0.0.1:1884", "url: mqtt://h\n  tls: {ca_file: ca.crt}"), 4, "broker.tls",
     "use mqtts://"),
    (("url: mqtt://127.0.0.1:1884", "url: mqtts://h\n  tls: {cert_file: c.crt}"), 4,
     "broker.tls.key_file", "expected cert_file and key_file together"),
    (("url: mqtt://127.0.0.1:1884", "url: mqtt://h\n  password_file: nope"), 4,
     "broker.password_file", "cannot read"),
    # the collector's own broker keys are not the agent's
    (("url: mqtt://127.0.0.1:1884", "url: mqtts://h\n  tls: {insecure: true}"), 4,
     "broker.tls.insecure", "unknown field"),
    (("url: mqtt://127.0.0.1:1884", "url: mqtt://h\n  session_expiry_s: 600"), 4,
     "broker.session_expiry_s", "unknown field"),
    (("ref: tiny", "ref: tiny\n  head: sideways"), 6, "model.head", "expected one of dense, tied"),
    (("log: queries.db", "log: queries.db\nserving: {queue_size: 0}"), 7, "serving.queue_size",
     "expected at least 1"),
    (("log: queries.db", "log: queries.db\nqueue: 3"), 7, "queue", "unknown field"),
    (("log: queries.db", ""), 1, "log", "required field is missing"),
])
def test_bad_fields_name_file_line_and_field(tmp_path, edit, line, field, message):
    path = write(tmp_path, MINIMAL.replace(*edit))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), line, field)
    assert message in err.reason


def test_unquoted_protocol_5_is_accepted(tmp_path):
    config = load_config(write(tmp_path, MINIMAL.replace(
        "url: mqtt://127.0.0.1:1884", "url: mqtt://h\n  protocol: 5")))
    assert config.broker.protocol is MqttProtocol.V5


@pytest.mark.parametrize("url, host, port, tls, user", [
    ("mqtt://localhost", "localhost", 1883, False, None),
    ("mqtts://b.lan", "b.lan", 8883, True, None),
    ("mqtt://ops:pw@10.0.0.2:1999", "10.0.0.2", 1999, False, "ops"),
])
def test_broker_urls(url, host, port, tls, user):
    broker = BrokerConfig.from_url(url)
    assert (broker.host, broker.port, broker.tls is not None, broker.username) == (host, port, tls,
                                                                                   user)


# -- every configured file is checked at start-up ----------------------------------------------

def test_a_policy_without_a_power_section_is_a_start_up_error(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text((POLICIES / "battery.yaml").read_text())
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + f"policy: {policy}\n"))
    message = str(info.value)
    assert "policy" in message and str(policy) in message and "needs a power: section" in message


def test_a_broken_policy_fails_at_start_up_with_its_file_and_field(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("points: 7\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL + f"policy: {broken}\npower:\n  kind: estimated\n"))
    assert str(broken) in str(info.value)


def test_the_default_token_cap_cannot_exceed_the_hard_limit(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.serving.max_new_tokens_limit == 256
    with pytest.raises(ConfigError, match="expected at most max_new_tokens_limit \\(16\\), got 64"):
        load_config(write(tmp_path, MINIMAL + "serving:\n  max_new_tokens: 64\n"
                                              "  max_new_tokens_limit: 16\n"))
