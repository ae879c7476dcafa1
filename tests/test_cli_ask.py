"""``tensorslm ask`` (chat by default, --raw, --system, sampling) and ``tensorslm command``
against a real mosquitto and the real daemon on the tiny test model."""
from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from tensorslm.agent.actuator import AgentActuator
from tensorslm.agent.broker_config import MqttProtocol
from tensorslm.agent.config import ServingConfig
from tensorslm.agent.generation import HFGenerator
from tensorslm.cli import cli
from tensorslm.controller.decision.control_loop import Controller
from tensorslm.controller.decision.policy import load_policy
from tensorslm.controller.power.power_model import board_model
from tensorslm.controller.power.simulated_battery import (LoadEstimate, SimulatedBattery,
                                                          SimulatedBatterySource)
from tests.agents import running_agent
from tests.brokers import free_port
from tests.tiny_model import CpuTimeMeter, tiny_tokenizer
from tests.wait import wait_until

pytestmark = pytest.mark.timeout(180)

POLICY = """\
points:
  - {name: full, rung: full, threads: 1, max_new_tokens: 6}
  - {name: eco, rung: full, threads: 1, max_new_tokens: 3}
dwell_seconds: 0
smoothing_seconds: 0
"""


class Recorder(HFGenerator):
    """The real generator, keeping the token ids of every request it encodes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.encoded: list[list[int]] = []

    def encode(self, request):
        ids = super().encode(request)
        self.encoded.append(ids)
        return ids


def lab_agent(device, tokenizer, model, mosquitto, tmp_path, *, protocol=MqttProtocol.V5,
              make_controller=None):
    """The agent of ``device`` in group lab serving a Recorder, while the with-block runs."""
    generator = Recorder(model, tokenizer, needs_bos=True, model_ref="tiny")
    actuator = AgentActuator(generator)
    controller = make_controller(actuator) if make_controller is not None else None
    return running_agent(mosquitto.url, device, generator, tmp_path / f"{device}.db",
                         protocol=protocol, group="lab", meter=CpuTimeMeter(),
                         controller=controller, actuator=actuator,
                         serving=ServingConfig(max_new_tokens=5, max_prompt_chars=100))


@pytest.fixture
def agent(tiny, mosquitto, tmp_path):
    model, tokenizer = tiny
    with lab_agent("pi-a", tokenizer, model, mosquitto, tmp_path) as agent:
        yield agent


def ask(mosquitto, *args: str):
    return CliRunner().invoke(cli, ["ask", *args, "--broker", mosquitto.url, "--timeout", "20"])


def test_ask_sends_chat_messages_through_the_template(agent, mosquitto):
    result = ask(mosquitto, "hello world", "--device", "pi-a")
    assert result.exit_code == 0, result.output
    tok = agent.generator.tokenizer
    assert tok.convert_ids_to_tokens(agent.generator.encoded[-1]) == [
        "<s>", "user", ":", "hello", "world", "assistant", ":"]


def test_ask_system_message_comes_first(agent, mosquitto):
    result = ask(mosquitto, "hello", "--device", "pi-a", "--system", "the small model")
    assert result.exit_code == 0, result.output
    tok = agent.generator.tokenizer
    assert tok.convert_ids_to_tokens(agent.generator.encoded[-1]) == [
        "<s>", "system", ":", "the", "small", "model", "user", ":", "hello", "assistant", ":"]


def test_ask_raw_sends_a_completion_prompt(agent, mosquitto):
    result = ask(mosquitto, "hello world", "--device", "pi-a", "--raw", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    tok = agent.generator.tokenizer
    assert tok.convert_ids_to_tokens(agent.generator.encoded[-1]) == ["<s>", "hello", "world"]
    assert agent.log.queries()[-1]["output_tokens"] == 2


def test_ask_sampling_options_reach_the_model(agent, mosquitto):
    runs = [ask(mosquitto, "hello", "--device", "pi-a", "--temperature", "5", "--top-k", "50",
                "--top-p", "0.99", "--seed", str(seed), "--no-stream") for seed in (1, 1, 2, 3)]
    assert all(r.exit_code == 0 for r in runs), [r.output for r in runs]
    answers = [r.stdout for r in runs]
    assert answers[0] == answers[1]                 # same seed: same sample
    assert len(set(answers)) > 1                    # other seeds: another sample


@pytest.mark.parametrize("args, message", [
    (["hi", "--device", "a", "--raw", "--system", "s"], "--system needs a chat prompt"),
    (["hi", "--device", "a", "--top-p", "0"], "Invalid value for '--top-p'"),
    (["hi", "--device", "a", "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
])
def test_ask_usage_errors(args, message):
    result = CliRunner().invoke(cli, ["ask", *args])
    assert result.exit_code == 2 and message in result.output


def test_a_chat_question_to_a_base_model_is_reported(tiny, mosquitto, tmp_path):
    model, _ = tiny
    base = tiny_tokenizer()
    base.chat_template = None
    with lab_agent("pi-base", base, model, mosquitto, tmp_path) as agent:
        result = ask(mosquitto, "hello", "--device", "pi-base")
        assert result.exit_code == 1
        assert ("error (not_a_chat_model): the served model tiny is not a chat model"
                in result.output)
        assert "ask again with --raw" in result.output
        assert agent.log.queries()[-1]["error_code"] == "not_a_chat_model"
        assert ask(mosquitto, "hello", "--device", "pi-base", "--raw").exit_code == 0


def test_a_refused_connection_is_reported_at_once():
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["ask", "hi", "--device", "a", "--broker",
                                      f"mqtt://127.0.0.1:{free_port()}", "--timeout", "60"])
    assert time.monotonic() - started < 3
    assert result.exit_code == 1
    assert "cannot reach the broker at mqtt://127.0.0.1:" in result.output
    assert "refused" in result.output.lower()


# -- tensorslm command -------------------------------------------------------------------------

@pytest.fixture(params=[MqttProtocol.V5, MqttProtocol.V311], ids=["mqtt5", "mqtt311"])
def governed(request, tiny, mosquitto, tmp_path):
    """An agent with a controller (simulated battery, two points) and the protocol to use."""
    model, tokenizer = tiny
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY)
    source = SimulatedBatterySource(SimulatedBattery(
        capacity_wh=10, load=LoadEstimate(board_model("raspberry-pi-4"))))
    with lab_agent("pi-g", tokenizer, model, mosquitto, tmp_path, protocol=request.param,
                   make_controller=lambda actuator: Controller(
                       source, load_policy(policy_path), actuator, interval=0.05)) as agent:
        controller = agent.controller
        controller.start()
        yield agent, request.param, policy_path
        controller.stop()


def command(mosquitto, protocol, *args: str):
    return CliRunner().invoke(cli, ["command", *args, "--broker", mosquitto.url, "--protocol",
                                    protocol.value, "--timeout", "10"])


def test_command_override_clear_and_reload(governed, mosquitto):
    agent, protocol, policy_path = governed
    controller = agent.controller
    wait_until(lambda: controller.current_point is not None
               and controller.current_point.name == "full", 5, "the policy's first point")

    result = command(mosquitto, protocol, "override", "pi-g", "eco", "--seconds", "600")
    assert result.exit_code == 0, result.output
    assert result.output == "pi-g: override: point eco for 600 s\n"
    wait_until(lambda: controller.current_point.name == "eco", 5, "the override")

    result = command(mosquitto, protocol, "clear", "pi-g")
    assert result.exit_code == 0, result.output
    assert "clear_override" in result.output
    wait_until(lambda: controller.current_point.name == "full", 5, "the override to clear")

    policy_path.write_text(POLICY.replace("max_new_tokens: 6", "max_new_tokens: 4"))
    result = command(mosquitto, protocol, "reload", "pi-g")
    assert result.exit_code == 0, result.output
    assert controller.policy.top.max_new_tokens == 4


def test_refused_commands_exit_1_with_the_device_reason(governed, mosquitto):
    agent, protocol, policy_path = governed
    result = command(mosquitto, protocol, "override", "pi-g", "turbo")
    assert result.exit_code == 1
    assert "error (bad_command):" in result.output
    assert "no operating point named 'turbo'; defined: full, eco" in result.output

    policy_path.write_text("points: []\n")
    result = command(mosquitto, protocol, "reload", "pi-g")
    assert result.exit_code == 1
    assert "policy reload failed, old policy kept" in result.output
    assert agent.controller.policy.top.name == "full"


def test_command_to_an_agent_without_a_policy_says_so(agent, mosquitto):
    result = command(mosquitto, MqttProtocol.V5, "override", "pi-a", "eco")
    assert result.exit_code == 1
    assert "needs a controller; this agent runs without an energy policy" in result.output


def test_command_to_an_absent_device_times_out_with_a_hint(mosquitto):
    result = CliRunner().invoke(cli, ["command", "reload", "pi-nobody", "--broker",
                                      mosquitto.url, "--timeout", "0.5"])
    assert result.exit_code == 1
    assert "no answer from pi-nobody within 0.5 s" in result.output


def test_a_device_that_went_offline_is_reported_at_once(tiny, mosquitto, tmp_path):
    model, tokenizer = tiny
    with lab_agent("pi-gone", tokenizer, model, mosquitto, tmp_path):
        pass   # online, then stopped and joined: it publishes its retained "offline"
    for args in (["ask", "hello", "--device", "pi-gone", "--timeout", "60"],
                 ["command", "reload", "pi-gone", "--timeout", "60"]):
        started = time.monotonic()
        result = CliRunner().invoke(cli, [*args, "--broker", mosquitto.url])
        assert time.monotonic() - started < 5
        assert result.exit_code == 1
        assert "pi-gone is offline (the broker holds its last status: offline)" in result.output


def test_an_online_device_is_asked_without_delay(agent, mosquitto):
    from tensorslm.agent.broker_config import BrokerConfig
    from tensorslm.agent.client import AskClient

    with AskClient(BrokerConfig.from_url(mosquitto.url)) as client:
        started = time.monotonic()
        assert client.device_status("pi-a") == "online"
        assert time.monotonic() - started < 0.4
        assert client.device_status("pi-never") is None   # no retained status: unknown
