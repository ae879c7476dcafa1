"""The energy meter against analytic power profiles, real drivers and simulated faults."""
from __future__ import annotations

import math
import time

import pytest

from tensorslm.controller.power.energy_meter import EnergyMeter
from tensorslm.controller.errors import ConfigError, SensorError
from tensorslm.controller.power.ina219 import Ina219, Ina219Source
from tensorslm.controller.power.ina219_sim import Ina219Model, SimulatedSMBus
from tensorslm.controller.power.power_model import BOARDS
from tensorslm.controller.power.rapl import RaplSource
from tensorslm.controller.power.readings import Method, PowerReading
from tensorslm.controller.power.simulated_battery import SimulatedBattery, SimulatedBatterySource


class Clock:
    def __init__(self, now=0.0):
        self.now = now

    def __call__(self):
        return self.now


class ProfileSource:
    """A power sensor whose watts follow ``profile(t)``; ``failing`` makes reads fail."""

    method = Method.INA219
    relative_uncertainty = 0.01

    def __init__(self, profile, clock):
        self.profile, self.clock, self.failing, self.reads = profile, clock, False, 0

    def read(self):
        self.reads += 1
        if self.failing:
            raise SensorError("simulated I2C fault")
        return PowerReading(time=self.clock(), method=self.method, watts=self.profile(self.clock()))

    def close(self):
        pass


def run(meter, clock, until, step=0.1, during=None):
    while clock.now < until - 1e-9:
        clock.now = round(clock.now + step, 9)
        if during:
            during(clock.now)
        meter.sample()


def test_ramp_through_real_ina219_driver():
    clock = Clock()
    chip = Ina219Model(shunt_ohms=0.1, bus_volts=5.0, clock=clock)
    chip.on_read = lambda c: setattr(c, "shunt_amps", 0.2 + 0.1 * clock.now)   # 1 W + 0.5 W/s
    driver = Ina219(shunt_ohms=0.1, max_current_amps=3.2, current_lsb_amps=100e-6,
                    bus=SimulatedSMBus({0x40: chip}))
    meter = EnergyMeter(Ina219Source(driver, clock=clock), sampler=False, clock=clock)
    clock.now = 1.0
    w = meter.begin()
    run(meter, clock, 5.0)
    r = meter.end(w)
    exact = 1.0 * 4 + 0.25 * (25 - 1)                # integral of 1 + 0.5 t over [1, 5]
    assert r.method is Method.INA219
    assert r.seconds == pytest.approx(4.0)
    assert r.joules == pytest.approx(exact, rel=2e-4)   # LSB quantisation only
    assert r.peak_watts == pytest.approx(3.5, rel=1e-3)
    assert r.mean_watts == pytest.approx(exact / 4, rel=2e-4)
    assert r.samples == 41
    assert r.uncertainty_joules == pytest.approx(math.hypot(0.01 * r.joules, 0.25 * 0.05 * 4 * 1.0), rel=0.05)


@pytest.mark.parametrize("step", [0.05, 0.1, 0.2])
def test_curved_profile_error_within_stated_uncertainty(step):
    clock = Clock()
    source = ProfileSource(lambda t: 3.0 + math.sin(t), clock)
    meter = EnergyMeter(source, sampler=False, clock=clock)
    w = meter.begin()
    run(meter, clock, 4.0, step)
    r = meter.end(w)
    exact = 12.0 + 1 - math.cos(4.0)
    assert abs(r.joules - exact) <= step ** 2 / 12 * 4 * 1.0 + 1e-9   # trapezoid bound
    assert abs(r.joules - exact) < r.uncertainty_joules


def test_baseline_subtraction():
    clock = Clock()
    load = {"extra": 0.0}
    meter = EnergyMeter(ProfileSource(lambda t: 2.0 + load["extra"], clock), sampler=False,
                        clock=clock)
    baseline = meter.measure_baseline(1.0, sleep=lambda s: run(meter, clock, clock.now + s))
    assert baseline.watts == pytest.approx(2.0)
    load["extra"] = 3.0
    clock.now += 0.5                  # the query starts a little later, at the new power
    w = meter.begin()
    run(meter, clock, clock.now + 2.0)
    r = meter.end(w)
    assert r.baseline_subtracted
    assert r.joules == pytest.approx(6.0)
    assert r.mean_watts == pytest.approx(3.0)


@pytest.mark.parametrize("overlap, a_joules, b_joules", [("full", 16.0, 16.0), ("shared", 12.0, 12.0)])
def test_overlapping_windows(overlap, a_joules, b_joules):
    clock = Clock()
    meter = EnergyMeter(ProfileSource(lambda t: 4.0, clock), overlap=overlap, sampler=False,
                        clock=clock)
    a = meter.begin()                 # A: [0, 4]
    run(meter, clock, 2.0)
    b = meter.begin()                 # B: [2, 6]
    run(meter, clock, 4.0)
    ra = meter.end(a)
    run(meter, clock, 6.0)
    rb = meter.end(b)
    assert (ra.joules, rb.joules) == (pytest.approx(a_joules), pytest.approx(b_joules))
    if overlap == "shared":          # shares add up to the machine's energy over [0, 6]
        assert ra.joules + rb.joules == pytest.approx(4.0 * 6)


def test_shared_three_windows_add_up():
    clock = Clock()
    meter = EnergyMeter(ProfileSource(lambda t: 1.0 + t, clock), overlap="shared",
                        sampler=False, clock=clock)
    a = meter.begin()
    run(meter, clock, 1.0)
    b = meter.begin()
    run(meter, clock, 1.5)
    c = meter.begin()
    run(meter, clock, 2.0)
    total = meter.end(b).joules
    run(meter, clock, 3.0)
    total += meter.end(a).joules
    run(meter, clock, 4.0)
    total += meter.end(c).joules
    assert total == pytest.approx(4.0 + 8.0)         # integral of 1 + t over [0, 4]


def _faulty_run(fault_from, fault_to):
    clock = Clock()
    source = ProfileSource(lambda t: 2.0 + t, clock)
    meter = EnergyMeter(source, sampler=False, clock=clock)
    w = meter.begin()

    def fault(t):
        source.failing = fault_from < t < fault_to

    run(meter, clock, 4.0, during=fault)
    return meter, meter.end(w)


def test_sensor_fault_mid_window_is_bridged():
    meter, r = _faulty_run(1.0, 1.6)
    _, clean = _faulty_run(0.0, 0.0)
    assert meter.failures == 5
    assert r.joules == pytest.approx(8.0 + 8.0)      # linear: bridging is exact
    assert r.missing_seconds == pytest.approx(0.6)
    assert clean.missing_seconds == 0.0
    assert r.uncertainty_joules - clean.uncertainty_joules > 0.5


def test_sensor_dead_for_most_of_window_raises():
    clock = Clock()
    source = ProfileSource(lambda t: 2.0, clock)
    meter = EnergyMeter(source, sampler=False, clock=clock)
    w = meter.begin()
    source.failing = True
    run(meter, clock, 2.0)
    with pytest.raises(SensorError, match="failed for 2.000 s of a 2.000 s window"):
        meter.end(w)


def test_rapl_counter_difference_across_wrap(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    (zone / "energy_uj").write_text("999000000\n")
    clock = Clock()
    source = RaplSource(root=tmp_path, clock=clock)
    meter = EnergyMeter(source, sampler=False, clock=clock)
    w = meter.begin()
    for k, uj in enumerate([999_500_000, 200_000, 1_500_001], start=1):
        clock.now = float(k)
        (zone / "energy_uj").write_text(f"{uj}\n")
        meter.sample()
    r = meter.end(w)
    assert r.method is Method.RAPL
    assert r.joules == pytest.approx(2.500002)
    assert r.peak_watts == pytest.approx(1.3, rel=1e-5)
    assert r.uncertainty_joules == pytest.approx(0.05 * r.joules)


def test_estimated_from_process_cpu_time():
    clock = Clock()
    cpu = [10.0]
    meter = EnergyMeter(model=BOARDS["raspberry-pi-4"], cpu_seconds=lambda: cpu[0],
                        sampler=False, clock=clock)
    with meter.measure() as w:
        clock.now, cpu[0] = 2.0, 11.5            # 1.5 CPU-seconds in 2 s
    r = w.report
    assert r.method is Method.ESTIMATED
    assert r.joules == pytest.approx(2.7 * 2 + 0.9 * 1.5)
    assert r.uncertainty_joules == pytest.approx(0.3 * r.joules)


def test_simulated_battery_window():
    clock = Clock()
    battery = SimulatedBattery(load=lambda: 4.0, clock=clock, acceleration=100.0)
    meter = EnergyMeter(SimulatedBatterySource(battery), sampler=False, clock=clock)
    clock.now = 1.0
    w = meter.begin()
    run(meter, clock, 3.5)
    r = meter.end(w)
    assert r.method is Method.SIMULATED
    assert r.joules == pytest.approx(10.0)
    assert battery.soc_percent < 100.0


def test_real_sampler_thread_takes_samples():
    source = ProfileSource(lambda t: 3.0, time.monotonic)
    meter = EnergyMeter(source, sample_hz=200.0)
    with meter.measure() as w:
        time.sleep(0.15)
    meter.close()
    assert w.report.samples >= 5
    assert w.report.joules == pytest.approx(3.0 * w.report.seconds)
    reads = source.reads
    time.sleep(0.05)                                 # sampler stopped with the last window
    assert source.reads == reads


def test_misuse_is_refused():
    clock = Clock()
    meter = EnergyMeter(ProfileSource(lambda t: 1.0, clock), sampler=False, clock=clock)
    w = meter.begin()
    meter.end(w)
    with pytest.raises(ConfigError, match="window 1 is not open"):
        meter.end(w)
    with pytest.raises(ConfigError, match="exactly one of a source or a board model"):
        EnergyMeter()
    with pytest.raises(ConfigError, match="overlap must be one of full, shared"):
        EnergyMeter(model=BOARDS["raspberry-pi-4"], overlap="split")
    gpio = type("Pin", (), {"method": Method.GPIO, "read": None, "close": None})()
    with pytest.raises(ConfigError, match="a gpio source measures no power"):
        EnergyMeter(gpio)


def test_fallback_estimate_when_sensor_sees_no_load():
    clock = Clock()
    cpu = [0.0]
    source = ProfileSource(lambda t: 5.0, clock)
    meter = EnergyMeter(source, sampler=False, clock=clock, cpu_seconds=lambda: cpu[0],
                        fallback=BOARDS["raspberry-pi-5"])
    w = meter.begin()
    source.failing = True                 # e.g. UPS on external power: no load watts
    run(meter, clock, 2.0)
    cpu[0] = 1.0
    r = meter.end(w)
    assert r.method is Method.ESTIMATED
    assert r.joules == pytest.approx(2 * 2.7 + 1.15)
    assert r.missing_seconds == pytest.approx(2.0)
    source.failing = False
    w = meter.begin()
    run(meter, clock, 3.0)
    assert meter.end(w).method is Method.INA219     # sensor back: measured again
