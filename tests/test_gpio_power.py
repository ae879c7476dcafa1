"""The power-loss pin through gpiozero's MockFactory, with an injected clock for debounce."""
from __future__ import annotations

import pytest

pytest.importorskip("gpiozero")

from tensorslm.controller.errors import ConfigError  # noqa: E402
from tensorslm.controller.power.gpio_power import PowerPinSource  # noqa: E402
from tensorslm.controller.power.readings import Method  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_power_lost_after_level_held_for_bounce_time(mock_factory):
    clock = Clock()
    source = PowerPinSource(6, active_high=True, bounce_time=0.05, clock=clock)
    pin = mock_factory.pin(6)
    r = source.read()
    assert r.method is Method.GPIO and r.power_lost is False and r.on_external_power is True
    pin.drive_high()
    clock.now += 0.02
    assert source.read().power_lost is False          # not yet held for 50 ms
    clock.now += 0.04
    assert source.read().power_lost is True
    assert source.transitions == 1
    source.close()


def test_glitches_shorter_than_bounce_are_ignored(mock_factory):
    clock = Clock()
    source = PowerPinSource(6, bounce_time=0.05, clock=clock)
    pin = mock_factory.pin(6)
    for _ in range(20):                               # 10 ms pulses: contact bounce
        pin.drive_high()
        clock.now += 0.01
        pin.drive_low()
        clock.now += 0.01
        assert source.read().power_lost is False
    assert source.transitions == 0
    source.close()


def test_active_low_pin_with_pull_up(mock_factory):
    clock = Clock()
    source = PowerPinSource(26, pull_up=True, bounce_time=0.0, clock=clock)
    pin = mock_factory.pin(26)
    assert source.read().power_lost is False          # pulled up: inactive
    pin.drive_low()
    assert source.read().power_lost is True
    source.close()


def test_negative_bounce_time_is_refused(mock_factory):
    with pytest.raises(ConfigError, match="bounce_time must be at least 0 seconds, got -1"):
        PowerPinSource(6, bounce_time=-1)
