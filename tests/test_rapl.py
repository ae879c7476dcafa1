"""RAPL counters from a powercap tree in tmp_path: units, wrap-around, permissions."""
from __future__ import annotations

import pytest

from tensorslm.controller.errors import ConfigError, SensorError
from tensorslm.controller.power.rapl import RaplSource, unwrap
from tensorslm.controller.power.readings import Method

MAX = 262_143_328_850


def zone(root, energy_uj, name="intel-rapl:0"):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "name").write_text("package-0\n")
    (d / "max_energy_range_uj").write_text(f"{MAX}\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    return d


class Clock:
    def __init__(self):
        self.now = 10.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("prev, cur, expected", [(100, 250, 150), (MAX - 50, 49, 100), (5, 5, 0)])
def test_unwrap(prev, cur, expected):
    assert unwrap(prev, cur, MAX) == expected


def test_counter_difference_and_watts(tmp_path):
    d = zone(tmp_path, 1_000_000)
    clock = Clock()
    source = RaplSource(root=tmp_path, clock=clock)
    (d / "energy_uj").write_text("13000000\n")
    clock.now += 2.0
    r = source.read()
    assert r.method is Method.RAPL
    assert r.energy_joules == pytest.approx(12.0)
    assert r.watts == pytest.approx(6.0)


def test_counter_wraps_around_max_range(tmp_path):
    d = zone(tmp_path, MAX - 2_000_000)
    clock = Clock()
    source = RaplSource(root=tmp_path, clock=clock)
    (d / "energy_uj").write_text("3000000\n")       # wrapped: 2 J + 1 uJ + 3 J
    clock.now += 1.0
    r = source.read()
    assert r.energy_joules == pytest.approx(5.000001)
    assert r.watts == pytest.approx(5.000001)


def test_missing_zone_lists_present(tmp_path):
    zone(tmp_path, 0, name="intel-rapl:1")
    with pytest.raises(ConfigError, match="zones present: intel-rapl:1"):
        RaplSource(root=tmp_path)


def test_root_only_counter_raises_sensor_error(tmp_path, monkeypatch):
    # Linux >= 5.10 makes energy_uj mode 0400 root; tests may run as root, so the
    # PermissionError that an ordinary user gets is injected at Path.read_text.
    d = zone(tmp_path, 0)
    source = RaplSource(root=tmp_path)
    real = type(d).read_text

    def read_text(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(d), "read_text", read_text)
    with pytest.raises(SensorError, match="readable by root only"):
        source.read()
