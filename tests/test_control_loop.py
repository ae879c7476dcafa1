"""The control loop with a scripted power source, a recording actuator and an injected clock."""
from __future__ import annotations

import datetime as dt
import logging
import threading

import pytest

from tensorslm.controller.decision.control_loop import Controller, Switch
from tensorslm.controller.decision.decide import Rule
from tensorslm.controller.errors import ControllerError, SensorError
from tensorslm.controller.decision.operating_point import OperatingPoint
from tensorslm.controller.decision.policy import load_policy
from tensorslm.controller.power.readings import Method, PowerReading

POLICY = """\
points:
  - {name: full, threads: 2, max_new_tokens: 256}
  - {name: balanced, rung: r64, threads: 1}
  - {name: eco, rung: r16, max_new_tokens: 48}
dwell_seconds: 0
smoothing_seconds: 0
battery:
  - {point: balanced, enter_below: 60, exit_above: 65}
  - {point: eco, enter_below: 30, exit_above: 35}
critical: {point: eco, enter_below: 10, exit_above: 15}
fallback: {point: balanced, after_failures: 3}
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedSource:
    """Returns the scripted readings in order; an exception in the script is raised."""

    method = Method.SIMULATED
    relative_uncertainty = None

    def __init__(self, clock: FakeClock, script: list) -> None:
        self.clock = clock
        self.script = list(script)
        self.reads = 0

    def push(self, *items) -> None:
        self.script.extend(items)

    def read(self) -> PowerReading:
        self.reads += 1
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        battery, external = item if isinstance(item, tuple) else (item, False)
        return PowerReading(time=self.clock(), method=Method.SIMULATED,
                            battery_percent=battery, on_external_power=external)

    def close(self) -> None:
        pass


class RecordingActuator:
    def __init__(self, fail_times: int = 0) -> None:
        self.applied: list[str] = []
        self.fail_times = fail_times

    def apply(self, point: OperatingPoint) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("rank store busy")
        self.applied.append(point.name)


@pytest.fixture
def policy_file(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def rig(policy_file):
    clock = FakeClock()
    source = ScriptedSource(clock, [])
    actuator = RecordingActuator()
    recorded: list[Switch] = []
    controller = Controller(source, load_policy(policy_file), actuator, interval=5.0,
                            clock=clock, local_time=lambda: dt.datetime(2026, 11, 23, 12, 0),
                            on_switch=recorded.append, retry_seconds=1.0, max_backoff=4.0)
    return controller, source, actuator, clock, recorded


def advance(controller, source, clock, *items):
    """Tick once per scripted item, moving the clock by the controller's own delay."""
    source.push(*items)
    decisions = []
    for _ in items:
        decisions.append(controller.tick())
        clock.now += controller.next_delay
    return decisions


def test_switches_are_applied_recorded_and_reported(rig):
    controller, source, actuator, clock, recorded = rig
    assert controller.current_point is None
    advance(controller, source, clock, 90, 80, 50, 50, 20)
    assert actuator.applied == ["full", "balanced", "eco"]
    assert [(s.from_point, s.to_point, s.rule) for s in recorded] == [
        (None, "full", Rule.DEFAULT), ("full", "balanced", Rule.BATTERY),
        ("balanced", "eco", Rule.BATTERY)]
    assert list(controller.switches) == recorded
    assert [s.time for s in recorded] == [1000.0, 1010.0, 1020.0]
    assert recorded[1].reading.battery_percent == 50
    assert recorded[1].wall_time == dt.datetime(2026, 11, 23, 12, 0)
    assert controller.current_point.name == "eco"
    assert controller.latest_reading.battery_percent == 20


def test_sensor_errors_back_off_then_fallback_then_recover(rig, caplog):
    controller, source, actuator, clock, recorded = rig
    advance(controller, source, clock, 90)
    fault = SensorError("I2C read failed at 0x42")
    with caplog.at_level(logging.WARNING, logger="tensorslm.controller.decision.control_loop"):
        decisions = advance(controller, source, clock, fault, fault, fault, fault, fault)
    assert decisions[:2] == [None, None]
    assert decisions[2].rule is Rule.FALLBACK and decisions[2].point.name == "balanced"
    assert actuator.applied == ["full", "balanced"]
    assert recorded[-1].reading is None and recorded[-1].rule is Rule.FALLBACK
    assert controller.consecutive_failures == 5
    assert clock.now == pytest.approx(1000 + 5 + 1 + 2 + 4 + 4 + 4)   # backoff 1, 2, 4, capped at 4
    assert "I2C read failed at 0x42" in caplog.text and "fallback after 3" in caplog.text
    advance(controller, source, clock, 90)
    assert controller.next_delay == 5.0 and controller.consecutive_failures == 0
    assert actuator.applied[-1] == "full"


def test_failing_actuator_keeps_previous_point_and_retries(policy_file):
    clock = FakeClock()
    source = ScriptedSource(clock, [])
    actuator = RecordingActuator(fail_times=2)
    controller = Controller(source, load_policy(policy_file), actuator, clock=clock)
    advance(controller, source, clock, 90, 90, 90)
    assert actuator.applied == ["full"]
    assert len(controller.switches) == 1 and controller.current_point.name == "full"


def test_override_applies_at_once_and_expires(rig):
    controller, source, actuator, clock, recorded = rig
    advance(controller, source, clock, 20)
    controller.set_override("full", seconds=12, reason="operator")
    advance(controller, source, clock, 20, 20, 20, 20)   # t = +5, +10, +15: expires at +17
    assert actuator.applied == ["eco", "full", "eco"]
    assert recorded[1].rule is Rule.OVERRIDE and recorded[1].reason == "operator"
    assert recorded[2].reason.startswith("override expired")
    with pytest.raises(ValueError, match="no operating point named 'max'"):
        controller.set_override("max", seconds=5)
    with pytest.raises(ControllerError, match="expected seconds > 0, got 0"):
        controller.set_override("full", seconds=0)


def test_reload_bad_file_keeps_old_policy_and_reports(rig, policy_file, caplog):
    controller, source, actuator, clock, recorded = rig
    advance(controller, source, clock, 50)
    old = controller.policy
    policy_file.write_text(POLICY.replace("exit_above: 65", "exit_above: 55"))
    with caplog.at_level(logging.ERROR, logger="tensorslm.controller.decision.control_loop"):
        error = controller.reload_policy()
    assert error is not None and error.line == 8 and error.field == "battery[0].exit_above"
    assert controller.policy is old
    assert "keeping the current policy" in caplog.text
    # a good file replaces it; the current point is kept if it still exists
    policy_file.write_text(POLICY.replace("{point: balanced, enter_below: 60",
                                          "{point: eco, enter_below: 60"))
    assert controller.reload_policy() is None
    assert controller.policy.battery_levels[0].point == "eco"
    advance(controller, source, clock, 50)
    assert actuator.applied == ["balanced", "eco"]


def test_external_power_is_top_point(rig):
    controller, source, actuator, clock, recorded = rig
    advance(controller, source, clock, 20, (20, True), (5, True), 5)
    assert actuator.applied == ["eco", "full", "eco"]
    assert [s.rule for s in recorded] == [Rule.BATTERY, Rule.EXTERNAL_POWER, Rule.CRITICAL]


def test_thread_runs_and_stops(policy_file):
    clock = FakeClock()
    applied = threading.Event()

    class Source(ScriptedSource):
        def read(self):
            self.script.append(45)
            return super().read()

    class Actuator(RecordingActuator):
        def apply(self, point):
            super().apply(point)
            applied.set()

    source, actuator = Source(clock, []), Actuator()
    controller = Controller(source, load_policy(policy_file), actuator, interval=0.002,
                            clock=clock)
    with controller:
        assert applied.wait(2.0)
        with pytest.raises(ControllerError, match="already running"):
            controller.start()
        while source.reads < 3:
            threading.Event().wait(0.002)
    reads = source.reads
    threading.Event().wait(0.01)
    assert source.reads == reads          # stopped
    assert actuator.applied == ["balanced"]


def test_bad_intervals_refused(policy_file):
    with pytest.raises(ControllerError, match="interval: expected seconds > 0, got 0"):
        Controller(ScriptedSource(FakeClock(), []), load_policy(policy_file),
                   RecordingActuator(), interval=0)


def test_reload_that_changes_only_a_knob_of_the_point_reapplies(rig, policy_file):
    controller, source, actuator, clock, recorded = rig
    advance(controller, source, clock, 20)
    policy_file.write_text(POLICY.replace("max_new_tokens: 48}", "max_new_tokens: 48, "
                                          "max_prompt_tokens: 64}"))
    assert controller.reload_policy() is None
    advance(controller, source, clock, 20)
    assert actuator.applied == ["eco", "eco"]
    assert controller.current_point.max_prompt_tokens == 64
