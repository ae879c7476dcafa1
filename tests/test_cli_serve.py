"""``tensorslm serve`` and ``tensorslm ask`` against a real mosquitto."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tensorslm.cli import cli
from tensorslm.agent.config import ServingConfig
from tensorslm.agent.broker_config import BrokerConfig
from tensorslm.agent.generation import HFGenerator
from tensorslm.agent.query_log import QueryLog
from tensorslm.controller.decision.policy import load_policy
from tests.agents import running_agent
from tests.tiny_model import CpuTimeMeter

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def agent(tiny, mosquitto, tmp_path):
    model, tokenizer = tiny
    with running_agent(mosquitto.url, "pi-c", HFGenerator(model, tokenizer), tmp_path / "q.db",
                       group="lab", meter=CpuTimeMeter(),
                       serving=ServingConfig(max_new_tokens=5, max_prompt_chars=100)) as agent:
        yield agent


@pytest.mark.parametrize("target", [["--device", "pi-c"], ["--fleet", "--group", "lab"]])
def test_ask_prints_streamed_answer_energy_and_point(agent, mosquitto, target):
    result = CliRunner().invoke(cli, ["ask", "hello world", *target, "--broker", mosquitto.url,
                                      "--timeout", "20"])
    assert result.exit_code == 0, result.output
    row = agent.log.queries()[-1]
    answer_line, summary = result.stdout.rstrip("\n"), result.stderr.strip()
    assert answer_line and len(answer_line.split()) >= 4
    assert row["output_tokens"] == 5 and row["outcome"] == "ok"
    assert f"5 tokens" in summary and "(estimated)" in summary and "device pi-c" in summary
    assert f"{row['energy_j']:.3g}" in summary


def test_ask_reports_an_error_reply(agent, mosquitto):
    result = CliRunner().invoke(cli, ["ask", "x" * 101, "--device", "pi-c", "--broker",
                                      mosquitto.url, "--timeout", "10"])
    assert result.exit_code == 1
    assert "error (prompt_too_long): expected at most 100 prompt characters, got 101" in \
        result.output


@pytest.mark.parametrize("args, message", [
    (["ask", "hi"], "give exactly one of --device ID or --fleet"),
    (["ask", "hi", "--device", "a", "--fleet"], "give exactly one of --device ID or --fleet"),
    (["ask", "hi", "--device", "a", "--broker", "http://x"], "expected a broker URL"),
])
def test_ask_usage_errors(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output


def test_ask_without_broker_fails_cleanly():
    from tests.brokers import free_port

    result = CliRunner().invoke(cli, ["ask", "hi", "--device", "a", "--broker",
                                      f"mqtt://127.0.0.1:{free_port()}", "--timeout", "1"])
    assert result.exit_code == 1
    assert "cannot reach the broker at mqtt://127.0.0.1:" in result.output
    assert "Connection refused" in result.output


def test_serve_refuses_a_bad_config_with_file_line_and_field(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("device: pi-1\nbroker: {url: 'mqtt://h'}\nmodel: {ref: x}\nlog: q.db\n"
                    "serving: {queue_size: -1}\n")
    result = CliRunner().invoke(cli, ["serve", "--config", str(path)])
    assert result.exit_code == 1
    assert f"{path}, line 5, field 'serving.queue_size': expected at least 1, got -1" in \
        result.output


def wait_online(broker, device: str, timeout: float) -> bool:
    """Wait for the device's retained status to say online."""
    import threading

    from tensorslm.agent.client import mqtt_client
    from tensorslm.agent.topics import Topics

    online = threading.Event()
    client = mqtt_client(BrokerConfig.from_url(broker.url), "status-wait")
    client.on_message = lambda c, u, msg: msg.payload == b"online" and online.set()
    client.connect(broker.host, broker.port)
    client.subscribe(Topics().status(device), qos=1)
    client.loop_start()
    try:
        return online.wait(timeout)
    finally:
        client.loop_stop()
        client.disconnect()


def test_serve_runs_a_saved_model_until_sigterm(tiny, mosquitto, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    config = tmp_path / "agent.yaml"
    config.write_text(f"device: pi-s\nbroker:\n  url: {mosquitto.url}\n  reconnect_min_s: 0.1\n"
                      f"model:\n  ref: {tmp_path / 'model'}\nlog: queries.db\n"
                      "serving: {max_new_tokens: 3}\n"
                      "power: {kind: simulated, soc_percent: 15}\n"
                      f"policy: {ROOT}/deploy/policies/battery.yaml\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", "from tensorslm.cli import main; main()", "-v",
                             "serve", "--config", str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        if not wait_online(mosquitto, "pi-s", 40):
            proc.kill()
            pytest.fail(f"the agent did not come online:\n{proc.communicate()[0]}")
        result = CliRunner().invoke(cli, ["ask", "hello", "--device", "pi-s", "--broker",
                                          mosquitto.url, "--timeout", "20"])
        assert result.exit_code == 0, result.output
        assert "3 tokens" in result.stderr and "(simulated)" in result.stderr
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
    log = QueryLog(tmp_path / "queries.db", "pi-s")
    rows = log.queries()
    policy = load_policy(ROOT / "deploy/policies/battery.yaml")
    [(outcome, point, method)] = [(r["outcome"], r["operating_point"], r["energy_method"])
                                  for r in rows]
    assert (outcome, method) == ("ok", "simulated")
    assert point != policy.top.name                 # 15 % battery: not the top point
    assert f"point {point} (rung {policy.point(point).rung})" in result.stderr
    assert [(s["from_point"], s["to_point"]) for s in log.switches()] == [(None, point)]
    assert "agent pi-s stopped after 1 queries" in output
